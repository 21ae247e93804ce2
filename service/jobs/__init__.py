"""The job lifecycle: the store interface and its SQLite and Redis stores, the runner that executes one
job (in a killable child process), the in-process worker, the Celery app and tasks, retention and
callbacks. Calls down into service.jobs.runner; never imports service.api."""
