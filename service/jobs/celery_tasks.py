"""The Celery task of ``merc worker`` and the worker process's start-up.

The task wraps ``service.jobs.worker.process_batch``, the same job code as the in-process worker
of ``merc serve``: the delivered job, plus queued jobs claimed beside it for one text-encoder call
(their own messages, delivered later, find them finished and do nothing). Around it, this module
adds what a fleet of processes needs:

* jobs run in a killable inference child (``service.jobs.sandbox``): models are loaded there once the
  worker is up (``worker_process_init``), never in a forked process, so CUDA is never forked;
  a job past ``MERC_JOB_TIMEOUT_S`` is stopped, fails with a reason, and the next job runs
  (Celery's own soft/hard limits are a backstop a little above it);
* a heartbeat thread marks the worker alive in Redis; retention sweeps (one process per
  interval, see ``service.jobs.retention``) and callback delivery (``service.jobs.callbacks``) run here too;
* a redelivered message whose job is still ``running`` means the worker running it died:
  the job is requeued, or failed with a reason after ``MERC_MAX_ATTEMPTS`` attempts; the
  heartbeat thread does the same, sooner, for any job whose worker's heartbeat expired;
* job-level Prometheus metrics on ``MERC_WORKER_METRICS_PORT``; JSON logs with the job id.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import redis
from celery import signals
from prometheus_client import Counter, Gauge, start_http_server

from service import metrics
from service.gpu import pick_device, renew_slot
from service.jobs.callbacks import Deliverer
from service.jobs.celery_app import LostJobs, app, get_queue_settings, open_store, redispatch_stranded
from service.jobs.redis_store import RedisJobStore
from service.jobs.retention import sweep_round
from service.jobs.sandbox import ChildRunner
from service.jobs.store import FAILED, QUEUED, RUNNING
from service.jobs.worker import CALLBACK_HOOKS, process_batch
from service.logging import job_context, setup_logging
from service.settings import Settings, get_settings

log = logging.getLogger("merc.celery")

BUSY = Gauge("merc_worker_busy", "1 while this worker runs a job", registry=metrics.REGISTRY)
READY = Gauge("merc_worker_ready", "1 once this worker's models are loaded", registry=metrics.REGISTRY)
DELIVERIES = Counter(
    "merc_worker_deliveries_total", "Job messages received, by what was done", ["outcome"], registry=metrics.REGISTRY
)
LOST = Counter("merc_worker_lost_jobs_total", "Jobs found abandoned by a dead worker", registry=metrics.REGISTRY)

_STATE: dict[str, Any] = {"store": None, "name": "", "gpu": None, "runner": None}


class StillRunning(Exception):
    """The job's message came back while another live worker still runs it."""


def store() -> RedisJobStore:
    """This process's job store (Redis state, files on the shared volume)."""
    if _STATE["store"] is None:
        if not get_queue_settings().queue:
            raise RuntimeError("MERC_QUEUE is not set: a worker needs the Redis the API queues jobs in")
        _STATE["store"] = open_store(get_settings())
    return _STATE["store"]


@app.task(
    name="merc.run_job",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
    retry_backoff=True,
    max_retries=5,
)
def run_job(self: Any, job_id: str) -> str | None:
    """Run one job by id; returns its final status (None: deleted before it ran)."""
    with job_context(job_id):
        try:
            return handle(job_id, self.request.hostname or _STATE["name"], get_settings())
        except StillRunning as e:
            DELIVERIES.labels("deferred").inc()
            delay = 3 * get_queue_settings().heartbeat_s
            log.info("job still running on %s; checking again in %.0f s", e, delay)
            run_job.apply_async((job_id,), task_id=job_id, countdown=delay)
            return RUNNING


def handle(job_id: str, me: str, settings: Settings, jobs: RedisJobStore | None = None) -> str | None:
    """What one delivery of ``job_id`` does: run it, recover it, or see it is already done."""
    jobs = jobs or store()
    status = jobs.status(job_id)
    if status is None:
        DELIVERIES.labels("deleted").inc()
        log.info("job was deleted before it ran")
        return None
    if status == RUNNING:
        holder = jobs.holder(job_id)
        if holder != me and jobs.holder_alive(job_id):
            raise StillRunning(holder)
        status = jobs.requeue_lost(job_id, settings.max_attempts)
        LOST.inc()
        log.warning("worker %s died while running this job: now %s", holder or "?", status)
        if status == FAILED:
            metrics.JOBS.labels(FAILED).inc()
    if status != QUEUED:
        DELIVERIES.labels("duplicate").inc()
        return status
    DELIVERIES.labels("run").inc()
    BUSY.set(1)
    started = time.perf_counter()
    try:
        jobs.worker_name = me
        done = process_batch(job_id, jobs, settings, _STATE["runner"])  # + queued jobs batched with it
        final = done[0][1] if done else None
    finally:
        BUSY.set(0)
    log.info("job %s in %.3f s", final, time.perf_counter() - started, extra={"status": final, "worker": me})
    return final


# ---------------------------------------------------------------- worker start-up


@signals.setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: Any) -> None:
    """JSON logs for Celery's own loggers too (connecting here stops Celery configuring them)."""
    setup_logging(level=logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel)


@signals.celeryd_init.connect
def _on_init(sender: Any = None, **_: Any) -> None:
    """The node name (``-n``), known in the main process before the pool starts."""
    _STATE["name"] = str(sender or "")


@signals.worker_process_init.connect
def _on_pool_process(**_: Any) -> None:
    """Sent in the process that will run jobs once it exists: the worker itself for the solo
    pool (the default), each child after the fork for prefork; so models load after any fork."""
    start_worker(_STATE["name"])


def start_worker(name: str) -> None:
    """Metrics endpoint, heartbeat thread, then the models (slow: the worker is ready after)."""
    qs, settings = get_queue_settings(), get_settings()
    _STATE["name"] = name or qs.worker_name or f"merc@{socket.gethostname()}"
    if qs.worker_metrics_port:
        start_http_server(qs.worker_metrics_port, registry=metrics.REGISTRY)
    settings.device, _STATE["gpu"] = pick_device(settings.device, store().redis, _STATE["name"], 3 * qs.heartbeat_s)
    threading.Thread(target=_heartbeat, args=(_STATE["name"],), name="merc-heartbeat", daemon=True).start()
    deliverer = Deliverer(store(), settings.callback_timeout_s, settings.callback_allow_private).start()
    CALLBACK_HOOKS.append(deliverer.notify)
    runner = _STATE["runner"] = ChildRunner(settings)
    models = runner.preload()  # in the inference child; the worker process itself never loads torch
    metrics.MODELS_LOADED.set(len(models))
    extra = {"models": models, "device": settings.device}
    log.info("worker %s loaded its models", _STATE["name"], extra=extra)


@signals.worker_ready.connect
def _on_consuming(**_: Any) -> None:
    """Ready (health check, tests) once the consumer takes jobs, after the models loaded."""
    READY.set(1)


def _heartbeat(name: str) -> None:
    """Keep ``name`` alive in Redis; requeue the jobs of dead workers; now and then delete jobs
    past their retention."""
    qs = get_queue_settings()
    last_sweep = 0.0
    lost = LostJobs(store(), get_settings().max_attempts, 3 * qs.heartbeat_s)
    while True:
        try:
            store().beat(name, 3 * qs.heartbeat_s)
            LOST.inc(sum(len(ids) for ids in lost.step().values()))
            if _STATE.get("gpu") and not renew_slot(store().redis, _STATE["gpu"], name, 3 * qs.heartbeat_s):
                log.warning("lost the claim on GPU %s (Redis was away longer than the TTL)", _STATE["gpu"])
            if time.monotonic() - last_sweep >= qs.sweep_interval_s:
                last_sweep = time.monotonic()
                sweep_round(store(), qs.retention_s, qs.sweep_interval_s)
                redispatch_stranded(store())
        except Exception:  # Redis away for a moment: try again next beat
            log.warning("heartbeat failed", exc_info=True)
        time.sleep(qs.heartbeat_s)
