"""The Celery application of distributed mode: Redis as broker, GPU workers pull jobs.

``MERC_QUEUE=redis://host:6379/0`` switches the API from its in-process worker to this
queue; ``merc worker`` (``celery -A service.jobs.celery_app worker``) runs the task defined in
``service.jobs.celery_tasks``. Only a job id travels through Redis: media, features and results
stay on the shared volume, job state in the Redis job store (``service.jobs.redis_store``).

Delivery guarantees: a message is acknowledged after the job ran (``acks_late``); a worker
killed mid-job never acknowledges it, so Redis hands it to another worker once
``MERC_VISIBILITY_TIMEOUT_S`` has passed (keep it above the longest job, ``MERC_JOB_TIMEOUT_S``);
sooner, ``LostJobs`` (in the API and every worker) requeues and sends again a job whose worker's
heartbeat expired. The job record counts attempts and fails the job with a reason after
``MERC_MAX_ATTEMPTS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.jobs.redis_store import UNAVAILABLE

log = logging.getLogger("merc.queue")
TASK = "merc.run_job"
QUEUE_NAME = "merc"


class QueueSettings(BaseSettings):
    """Settings of distributed mode (environment ``MERC_<NAME>``, like ``service.settings``)."""

    model_config = SettingsConfigDict(env_prefix="MERC_", extra="ignore")

    queue: str | None = Field(None, description="redis://host:6379/0 enables distributed mode (Celery)")
    visibility_timeout_s: float = Field(3900.0, gt=0, description="unacknowledged job redelivered after this")
    retention_s: float = Field(7 * 86400.0, gt=0, description="finished jobs (results, media) deleted after this")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often expired jobs are looked for")
    heartbeat_s: float = Field(5.0, gt=0, description="worker liveness refresh; dead after 3 missed beats")
    redis_timeout_s: float = Field(5.0, gt=0, description="a Redis command unanswered this long fails (503)")
    worker_metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus port of a worker (0: off)")
    worker_name: str | None = Field(None, description="Celery node name [merc@<hostname>]")


@lru_cache
def get_queue_settings() -> QueueSettings:
    return QueueSettings()


def celery_config(qs: QueueSettings, job_timeout_s: float | None = None) -> dict[str, Any]:
    """One worker process per GPU: solo pool, one message at a time, acknowledged after the job.

    Jobs are stopped at ``job_timeout_s`` by the worker's own supervision (service.jobs.sandbox);
    Celery's soft and hard time limits sit a little above it as a backstop (pools that enforce them).
    """
    if job_timeout_s is None:
        from service.settings import get_settings

        job_timeout_s = get_settings().job_timeout_s
    restore_every = max(1.0, min(10.0, qs.visibility_timeout_s / 5))
    transport = {
        "visibility_timeout": qs.visibility_timeout_s,
        "unacked_restore_interval": restore_every,  # look for abandoned messages this often
        "unacked_restore_throttle": 1,
    }
    return {
        "task_default_queue": QUEUE_NAME,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_ignore_result": True,  # job results live in the job store, read by reference
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": int(qs.retention_s),
        "worker_pool": "solo",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": qs.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_soft_time_limit": job_timeout_s + 30,
        "task_time_limit": job_timeout_s + 60,
    }


def make_app(qs: QueueSettings | None = None) -> Celery:
    """The Celery app for ``qs.queue`` (broker and result backend); tasks in service.jobs.celery_tasks."""
    qs = qs or get_queue_settings()
    url = qs.queue or "redis://localhost:6379/0"
    app = Celery("merc", broker=url, backend=url, include=["service.jobs.celery_tasks"])
    app.conf.update(celery_config(qs))
    return app


app = make_app()


def open_store(settings: Any, qs: QueueSettings | None = None, api: bool = False) -> Any:
    """The job store of this mode: Redis-backed when ``MERC_QUEUE`` is set, else SQLite.

    Deleting a job also drops Celery's copies. ``api``: new jobs are sent to the workers as
    they are stored, and jobs an earlier API stored but never sent are sent now.
    """
    qs = qs or get_queue_settings()
    if not qs.queue:
        from service.jobs.store import JobStore

        return JobStore(settings.data_dir)
    from service.jobs.redis_store import RedisJobStore

    store = RedisJobStore(qs.queue, Path(settings.data_dir), timeout_s=qs.redis_timeout_s)
    store.on_delete = forget
    if api:
        store.on_create = lambda job_id: dispatch_or_defer(store, job_id)
        try:
            redispatch_stranded(store)
        except UNAVAILABLE:  # Redis away at start: the API starts, answers 503, sends them later
            log.warning("Redis unreachable at start: stranded jobs are sent once it is back", exc_info=True)
    return store


def dispatch_or_defer(store: Any, job_id: str) -> None:
    """``dispatch``, or leave the stored job to ``redispatch_stranded`` when the broker refuses it now:
    the job is accepted (its record exists), so the request must not fail and be sent again."""
    try:
        dispatch(store, job_id)
    except (*UNAVAILABLE, OperationalError):
        log.warning("job %s stored but not yet sent to the workers; sent again within a minute", job_id)


def dispatch(store: Any, job_id: str, celery: Celery | None = None) -> None:
    """Hand a stored, queued job to the workers (only its id goes through Redis)."""
    (celery or app).send_task(TASK, args=[job_id], task_id=job_id, queue=QUEUE_NAME)
    store.mark_dispatched(job_id)


def redispatch_stranded(store: Any, older_than_s: float = 30.0, celery: Celery | None = None) -> list[str]:
    """Send again queued jobs that never reached the broker (an API stopped between store and send)."""
    stranded = store.undispatched(older_than_s)
    for job_id in stranded:
        dispatch(store, job_id, celery)
    return stranded


class LostJobs:
    """Finds running jobs whose worker died (its heartbeat expired) and requeues them at once, or fails
    them with a reason after ``max_attempts``, instead of waiting for the broker's visibility timeout.

    Every API process and worker runs one (``step`` once per heartbeat); the store moves each job
    once. After Redis was unreachable, live workers' beats may have lapsed: no job is judged lost
    until Redis has answered for a whole heartbeat TTL, time for every live worker to beat again."""

    def __init__(
        self, store: Any, max_attempts: int, ttl_s: float, send: Callable[[Any, str], None] | None = None
    ) -> None:
        self.store, self.max_attempts, self.ttl_s = store, max_attempts, ttl_s
        self.send = send or dispatch_or_defer  # a requeued job's new message
        self._watching_since = self._last_look = 0.0

    def step(self) -> dict[str, list[str]]:
        """One look; the ids requeued (and sent to the workers again) and failed."""
        now = time.monotonic()
        if now - self._last_look > self.ttl_s:  # first look, or none for a while (Redis away): wait a TTL
            self._watching_since = now
        try:
            self.store.redis.ping()
            self._last_look = now
            if now - self._watching_since < self.ttl_s:
                return {"requeued": [], "failed": []}
            moved = self.store.recover_lost(self.max_attempts)
            for job_id in moved["requeued"]:
                self.send(self.store, job_id)
        except UNAVAILABLE:
            return {"requeued": [], "failed": []}
        for what, ids in moved.items():
            if ids:
                log.warning("jobs of dead workers %s: %s", what, ", ".join(ids))
        return moved

    def start(self, interval_s: float) -> threading.Thread:
        """A daemon thread calling ``step`` every ``interval_s`` seconds (the API's)."""

        def loop() -> None:
            while True:
                try:
                    self.step()
                except Exception:  # never let the watch die
                    log.warning("lost-job watch failed", exc_info=True)
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="merc-lost-jobs", daemon=True)
        thread.start()
        return thread


def forget(job_id: str, celery: Celery | None = None) -> None:
    """Drop Celery's result entry of a deleted job (none is written while task results are ignored).

    The job's message, if still queued, holds only the id: the worker that receives it finds
    the job gone and acknowledges it without running anything. (Revoking it instead would
    make every worker write a REVOKED entry for the id.)
    """
    (celery or app).AsyncResult(job_id).forget()
