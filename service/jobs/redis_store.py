"""The job store of distributed mode: job state in Redis, job files on the shared volume.

Same interface as the SQLite ``service.jobs.store.JobStore`` (the API and ``process_job`` use
either), chosen when ``MERC_QUEUE`` is set. Why Redis and not SQLite on the shared volume:
worker hosts reach Redis anyway (it is the broker), SQLite's locking is unsafe on network
file systems, and an API restart or a second API replica sees every job at once.

Layout (``prefix`` defaults to ``merc:``)::

    merc:job:<id>            hash: status, model, kind, times, attempts, worker and its run, error (JSON), ...
    merc:status:<status>     sorted set of ids per status, scored by the time they entered it
    merc:finished            sorted set of finished ids, scored by finish time (retention)
    merc:alive:<worker>      the worker's run id, with a TTL refreshed while it lives (see ``beat``)
    merc:lease:<name>        a lock with an expiry (per-conversation appends, the retention sweeper);
                             a worker's names it and run, and stops blocking once that run's beat expires
    merc:outbox:<id>         a callback delivery (url, body, attempts); merc:outbox:due scores them
    <data_dir>/jobs/<id>/    request.json, media, features.npz, result.json (by reference; an
                             appended conversation's result is a new result.<hex>.json, named in
                             the hash's ``result_file`` by a compare-and-set)

Status transitions, the append compare-and-set, lease release and outbox claims are single
Lua scripts, so they are atomic across hosts and API replicas.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import redis

from service.jobs.files import atomic_write
from service.jobs.store import (
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TMP_MAX_AGE_S,
    JobStore,
    dumps,
    hold_lease,
    sweep_tmp_dir,
)

_MOVE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or (ARGV[2] ~= '' and cur ~= ARGV[2]) then return 0 end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', ARGV[1] .. 'status:' .. cur, id)
redis.call('ZADD', ARGV[1] .. 'status:' .. ARGV[3], ARGV[4], id)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'updated_at', ARGV[4])
if ARGV[3] == 'succeeded' or ARGV[3] == 'failed' then redis.call('ZADD', ARGV[1] .. 'finished', ARGV[4], id) end
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
_UPDATE = """
local cur = redis.call('HMGET', KEYS[1], 'status', 'n_utterances')
if cur[1] ~= 'succeeded' or (ARGV[1] ~= '' and cur[2] ~= ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'n_utterances', ARGV[2], 'result_file', ARGV[3], 'updated_at', ARGV[4])
return 1
"""
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, run = string.match(cur, '^%x+ (%S+) (%S+)$')
  if not holder or redis.call('GET', ARGV[3] .. holder) == run then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_LOST = """
local job = redis.call('HMGET', KEYS[1], 'status', 'worker', 'run', 'attempts', 'id')
if job[1] ~= 'running' then return 0 end
local beat = false
if job[2] and job[2] ~= '' then beat = redis.call('GET', ARGV[1] .. 'alive:' .. job[2]) end
if beat and (not job[3] or beat == job[3]) then return 0 end
local attempts, new = tonumber(job[4] or '0'), 'queued'
if attempts >= tonumber(ARGV[2]) then new = 'failed' end
redis.call('ZREM', ARGV[1] .. 'status:running', job[5])
redis.call('ZADD', ARGV[1] .. 'status:' .. new, ARGV[3], job[5])
redis.call('HSET', KEYS[1], 'status', new, 'updated_at', ARGV[3])
if new == 'failed' then
  redis.call('ZADD', ARGV[1] .. 'finished', ARGV[3], job[5])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3], 'error', (string.gsub(ARGV[4], '{n}', tostring(attempts))))
  return 2
end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  redis.call('HINCRBY', ARGV[4] .. id, 'attempts', 1)
end
return ids
"""
UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)  # Redis gone, stopped, loading
_FLOATS = ("created_at", "updated_at", "started_at", "finished_at", "dispatched_at")
_INTS = ("attempts", "n_utterances")
LOST = {
    "type": "urn:merc:problem:worker-lost",
    "title": "Worker lost",
    "detail": "the worker running this job stopped {n} times (killed, out of memory or host lost)",
}


class RedisJobStore:
    """Jobs shared by the API and every worker host through one Redis."""

    def __init__(self, url: str, data_dir: str | Path, prefix: str = "merc:", timeout_s: float = 5.0) -> None:
        self.url, self.prefix = url, prefix
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.tmp_dir = self.data_dir / "tmp"
        for d in (self.data_dir, self.jobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.redis = redis.Redis.from_url(  # a stopped Redis: TimeoutError after timeout_s, never a hang
            url, decode_responses=True, health_check_interval=30, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )  # fmt: skip
        self.worker_name = ""  # recorded by start(): set by a worker process to its node name
        self.incarnation = uuid.uuid4().hex[:12]  # this process's run: a restart under the same name is another
        # the API sets these to hand new jobs to Celery and to drop Celery's copies of deleted ones
        self.on_create: Callable[[str], None] | None = None
        self.on_delete: Callable[[str], None] | None = None
        self._move = self.redis.register_script(_MOVE)
        self._update = self.redis.register_script(_UPDATE)
        self._release = self.redis.register_script(_RELEASE)
        self._claim = self.redis.register_script(_CLAIM)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._lost = self.redis.register_script(_LOST)

    # ------------------------------------------------------------ the JobStore interface

    job_dir = JobStore.job_dir  # the same folder layout, on the shared volume
    new_id = staticmethod(JobStore.new_id)

    def create(self, job_id: str, model: str, kind: str, n_utterances: int, callback_url: str | None = None) -> None:
        """Insert a queued job (its folder must already hold request.json)."""
        now = time.time()
        fields = {"id": job_id, "status": QUEUED, "model": model, "kind": kind, "created_at": now}
        fields |= {"updated_at": now, "attempts": 0, "n_utterances": n_utterances}
        if callback_url:
            fields["callback_url"] = callback_url
        with self.redis.pipeline() as p:
            p.hset(self._key(job_id), mapping=fields)
            p.zadd(self._status_key(QUEUED), {job_id: now})
            p.execute()
        if self.on_create is not None:
            self.on_create(job_id)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as a dict like the SQLite store's row (``result`` read from result.json), or None."""
        raw = self.redis.hgetall(self._key(job_id))
        if not raw:
            return None
        job: dict[str, Any] = {"callback_url": None, "started_at": None, "finished_at": None, **raw}
        for k in _FLOATS:
            job[k] = float(job[k]) if job.get(k) else None
        for k in _INTS:
            job[k] = int(job.get(k) or 0)
        job["error"] = json.loads(raw["error"]) if raw.get("error") else None
        job["result"] = self._read_result(job_id, raw.get("result_file")) if job["status"] == SUCCEEDED else None
        return job

    def status(self, job_id: str) -> str | None:
        return self.redis.hget(self._key(job_id), "status")

    def start(self, job_id: str) -> bool:
        """queued -> running, atomically across hosts; counts the attempt and records the worker (name and run)."""
        now = time.time()
        fields = {"started_at": now, "worker": self.worker_name, "run": self.incarnation}
        return self._transition(job_id, QUEUED, RUNNING, attempt=True, **fields)

    def finish(self, job_id: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        """running -> succeeded (result written to result.json) or failed (with ``error``);
        False if deleted or not running. ValueError for a non-finite ``result``."""
        if self.status(job_id) != RUNNING:
            return False
        if error is None and not self._write_result(job_id, result, "result.json"):
            return False
        fields: dict[str, Any] = {"finished_at": time.time()}
        if error is not None:
            fields["error"] = json.dumps(error)
        return self._transition(job_id, RUNNING, FAILED if error is not None else SUCCEEDED, **fields)

    def update_result(
        self, job_id: str, result: dict[str, Any], n_utterances: int, expected_n: int | None = None
    ) -> bool:
        """Replace a succeeded job's result (appended utterances); with ``expected_n``, only if the
        conversation still has that many utterances: a compare-and-set in one Lua script, so two
        API replicas or workers cannot lose each other's turns."""
        name = f"result.{uuid.uuid4().hex}.json"
        if self.status(job_id) != SUCCEEDED or not self._write_result(job_id, result, name):
            return False
        previous = self.redis.hget(self._key(job_id), "result_file")
        args = ["" if expected_n is None else str(expected_n), str(n_utterances), name, time.time()]
        if self._update(keys=[self._key(job_id)], args=args) != 1:
            (self.job_dir(job_id) / name).unlink(missing_ok=True)
            return False
        if previous:
            (self.job_dir(job_id) / previous).unlink(missing_ok=True)
        return True

    def next_queued(self) -> str | None:
        ids = self.redis.zrange(self._status_key(QUEUED), 0, 0)
        return ids[0] if ids else None

    def depth(self) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as p:
            for s in STATUSES:
                p.zcard(self._status_key(s))
            return dict(zip(STATUSES, p.execute(), strict=True))

    def pending(self) -> int:
        d = self.depth()
        return d[QUEUED] + d[RUNNING]

    def recover(self, max_attempts: int) -> dict[str, list[str]]:
        """Nothing to do at API start: running jobs belong to workers; lost ones come back via the broker."""
        return {"requeued": [], "failed": []}

    def delete(self, job_id: str) -> bool:
        """Remove the job everywhere: its hash, its index entries, its folder (media, features, result)."""
        with self.redis.pipeline() as p:
            p.delete(self._key(job_id))
            for s in STATUSES:
                p.zrem(self._status_key(s), job_id)
            p.zrem(self.prefix + "finished", job_id)
            existed = p.execute()[0]
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        if existed and self.on_delete is not None:
            self.on_delete(job_id)
        return bool(existed)

    # ------------------------------------------------------------ leases (locks that expire)

    def acquire(self, name: str, ttl_s: float) -> str | None:
        """Take the lease ``name`` for ``ttl_s`` seconds: its token, or None while held.

        A worker's token names it (node name and run): its lease stops blocking as soon as its
        heartbeat expires (killed, host lost), not at the end of ``ttl_s``."""
        token = uuid.uuid4().hex + (f" {self.worker_name} {self.incarnation}" if self.worker_name else "")
        args = [token, max(1, int(ttl_s * 1000)), self.prefix + "alive:"]
        return token if self._acquire(keys=[self.prefix + "lease:" + name], args=args) == 1 else None

    def lease_holder(self, name: str) -> str:
        """The worker holding the lease ``name`` ('' if free or held by an API process)."""
        parts = (self.redis.get(self.prefix + "lease:" + name) or "").split()
        return parts[1] if len(parts) == 3 else ""

    def release(self, name: str, token: str) -> bool:
        return self._release(keys=[self.prefix + "lease:" + name], args=[token]) == 1

    def lock(self, name: str, ttl_s: float, wait_s: float) -> AbstractContextManager[str]:
        """One holder at a time across every host; Busy after ``wait_s``."""
        return hold_lease(self, name, ttl_s, wait_s)

    # ------------------------------------------------------------ the callback outbox

    def outbox_add(self, job_id: str, url: str, body: dict[str, Any]) -> str:
        item_id = uuid.uuid4().hex
        fields = {"id": item_id, "job_id": job_id, "url": url, "body": dumps(body), "attempts": 0}
        with self.redis.pipeline() as p:
            p.hset(self.prefix + "outbox:" + item_id, mapping=fields)
            p.zadd(self.prefix + "outbox:due", {item_id: time.time()})
            p.execute()
        return item_id

    def outbox_claim(self, limit: int, lease_s: float) -> list[dict[str, Any]]:
        """Up to ``limit`` due deliveries, hidden from other deliverers for ``lease_s`` seconds."""
        now = time.time()
        args = [now, limit, now + lease_s, self.prefix + "outbox:"]
        ids = self._claim(keys=[self.prefix + "outbox:due"], args=args)
        out = []
        for item_id in ids:
            raw = self.redis.hgetall(self.prefix + "outbox:" + item_id)
            if raw:
                out.append({**raw, "attempts": int(raw["attempts"]), "body": json.loads(raw["body"])})
            else:  # done meanwhile
                self.redis.zrem(self.prefix + "outbox:due", item_id)
        return out

    def outbox_retry(self, item_id: str, due: float, error: str) -> None:
        with self.redis.pipeline() as p:
            p.hset(self.prefix + "outbox:" + item_id, "last_error", error[:500])
            p.zadd(self.prefix + "outbox:due", {item_id: due})
            p.execute()

    def outbox_done(self, item_id: str) -> None:
        with self.redis.pipeline() as p:
            p.delete(self.prefix + "outbox:" + item_id)
            p.zrem(self.prefix + "outbox:due", item_id)
            p.execute()

    def outbox_size(self) -> int:
        return int(self.redis.zcard(self.prefix + "outbox:due"))

    def sweep_tmp(self, older_than_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Remove uploads left in the shared tmp/ by a crashed request of any API replica."""
        return sweep_tmp_dir(self.tmp_dir, older_than_s)

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------ distributed mode only

    def requeue_lost(self, job_id: str, max_attempts: int) -> str | None:
        """A running job whose worker is gone: back to queued, or failed after ``max_attempts``."""
        job = self.redis.hmget(self._key(job_id), "status", "attempts")
        if job[0] != RUNNING:
            return job[0]
        attempts = int(job[1] or 0)
        if attempts >= max_attempts:
            error = {**LOST, "detail": LOST["detail"].format(n=attempts)}
            self._transition(job_id, RUNNING, FAILED, finished_at=time.time(), error=json.dumps(error))
            return FAILED
        return QUEUED if self._transition(job_id, RUNNING, QUEUED) else self.status(job_id)

    def recover_lost(self, max_attempts: int) -> dict[str, list[str]]:
        """Running jobs whose worker's heartbeat expired (or that a worker restarted under the same
        name started in its earlier run): back to queued, or failed after ``max_attempts``. Each
        check and move is one Lua script, so concurrent callers move a job once."""
        error = json.dumps(LOST)  # {n} becomes the attempts in the script
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for job_id in self.redis.zrange(self._status_key(RUNNING), 0, -1):
            moved = self._lost(keys=[self._key(job_id)], args=[self.prefix, max_attempts, time.time(), error])
            if moved:
                out["requeued" if moved == 1 else "failed"].append(job_id)
        return out

    def holder(self, job_id: str) -> str:
        """The worker that last started the job ('' if none)."""
        return self.redis.hget(self._key(job_id), "worker") or ""

    def holder_alive(self, job_id: str) -> bool:
        """Whether the run of the worker that started the job still beats."""
        worker, run = self.redis.hmget(self._key(job_id), "worker", "run")
        beat = self.redis.get(self.prefix + "alive:" + worker) if worker else None
        return beat is not None and (not run or beat == run)

    def mark_dispatched(self, job_id: str) -> None:
        self.redis.hset(self._key(job_id), "dispatched_at", time.time())

    def undispatched(self, older_than_s: float) -> list[str]:
        """Queued jobs never handed to the broker (the API stopped between create and send)."""
        cutoff = time.time() - older_than_s
        ids = self.redis.zrangebyscore(self._status_key(QUEUED), "-inf", cutoff)
        with self.redis.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hget(self._key(job_id), "dispatched_at")
            marks = p.execute()
        return [j for j, mark in zip(ids, marks, strict=True) if not mark]

    def expired(self, retention_s: float) -> list[str]:
        """Ids of jobs finished more than ``retention_s`` seconds ago."""
        return self.redis.zrangebyscore(self.prefix + "finished", "-inf", time.time() - retention_s)

    def beat(self, worker: str, ttl_s: float) -> None:
        """Say that ``worker`` (this run of it) is alive for the next ``ttl_s`` seconds."""
        self.redis.set(self.prefix + "alive:" + worker, self.incarnation, px=int(ttl_s * 1000))

    def alive(self, worker: str) -> bool:
        return bool(worker) and self.redis.exists(self.prefix + "alive:" + worker) == 1

    def live_workers(self) -> list[str]:
        """Names of the workers whose heartbeat has not expired."""
        start = len(self.prefix + "alive:")
        return sorted(k[start:] for k in self.redis.scan_iter(self.prefix + "alive:*", count=1000))

    # ------------------------------------------------------------ helpers

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _status_key(self, status: str) -> str:
        return f"{self.prefix}status:{status}"

    def _transition(self, job_id: str, expected: str, new: str, attempt: bool = False, **fields: Any) -> bool:
        pairs = [str(x) for kv in fields.items() for x in kv]
        args = [self.prefix, expected, new, time.time(), "1" if attempt else "0", *pairs]
        return self._move(keys=[self._key(job_id)], args=args) == 1

    def _write_result(self, job_id: str, result: dict[str, Any] | None, name: str) -> bool:
        """``name`` in the job's folder, atomically; False if the folder is gone (deleted job)."""
        folder = self.job_dir(job_id)
        if not folder.is_dir():
            return False
        text = dumps(result) or "null"  # ValueError for NaN before anything is written
        try:
            atomic_write(folder / name, lambda tmp: tmp.write_text(text))
        except FileNotFoundError:  # deleted meanwhile
            return False
        return True

    def _read_result(self, job_id: str, name: str | None = None) -> dict[str, Any] | None:
        try:
            return json.loads((self.job_dir(job_id) / (name or "result.json")).read_text())
        except (OSError, ValueError):
            return None
