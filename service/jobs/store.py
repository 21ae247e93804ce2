"""The job store: one SQLite file plus one folder per job under the data directory.

Layout of ``MERC_DATA_DIR``::

    jobs.sqlite3            job rows: status, model, times, attempts, error, result JSON;
                            leases (locks with an expiry) and the callback outbox
    jobs/<id>/request.json  the validated conversation, model, media descriptions
    jobs/<id>/video.<ext>   uploaded media, named by sniffed content (never the upload name)
    jobs/<id>/audio.<ext>
    jobs/<id>/features.npz  per-utterance features of the conversation (for appended turns)
    tmp/                    uploads while they stream in (removed on every path; left-overs of
                            a crash are swept by ``sweep_tmp``)

Any process may open the store (WAL mode): the API, in-process worker threads, or
separate worker processes (issue #5). A lease names its holder and stops blocking once that
holder is gone (a killed process here; an expired heartbeat in the Redis store).
Status moves queued -> running -> succeeded | failed; ``start`` is atomic, so two workers
never run the same job, and ``finish`` only ends a running job. ``JobStoreProtocol`` is the
interface shared with ``service.jobs.redis_store``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
TMP_MAX_AGE_S = 900.0  # an upload not written to for this long belongs to a dead request
_HOST = socket.gethostname()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    n_utterances INTEGER NOT NULL DEFAULT 0,
    callback_url TEXT,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, token TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due);
"""


class Busy(Exception):
    """A lease (per-conversation lock) is held by someone else for longer than we may wait;
    ``holder`` names who holds it (a live worker, or '' when unknown)."""

    def __init__(self, name: str, holder: str = "", waited_s: float = 0.0) -> None:
        held = f"held by {holder}" if holder else "held"
        super().__init__(f"{name} is {held} (waited {waited_s:g} s)")
        self.name, self.holder, self.waited_s = name, holder, waited_s


@runtime_checkable
class JobStoreProtocol(Protocol):
    """What the API, the workers, retention and callback delivery need from a job store.

    Implemented by ``JobStore`` (SQLite, one host) and ``service.jobs.redis_store.RedisJobStore``
    (distributed mode); ``tests/distributed/test_store_contract.py`` runs one suite on both.
    """

    data_dir: Path
    jobs_dir: Path
    tmp_dir: Path

    def job_dir(self, job_id: str) -> Path: ...
    def new_id(self) -> str: ...
    def create(
        self, job_id: str, model: str, kind: str, n_utterances: int, callback_url: str | None = None
    ) -> None: ...
    def get(self, job_id: str) -> dict[str, Any] | None: ...
    def status(self, job_id: str) -> str | None: ...
    def start(self, job_id: str) -> bool: ...
    def finish(
        self, job_id: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> bool: ...
    def update_result(
        self, job_id: str, result: dict[str, Any], n_utterances: int, expected_n: int | None = None
    ) -> bool: ...
    def next_queued(self) -> str | None: ...
    def depth(self) -> dict[str, int]: ...
    def pending(self) -> int: ...
    def recover(self, max_attempts: int) -> dict[str, list[str]]: ...
    def expired(self, retention_s: float) -> list[str]: ...
    def delete(self, job_id: str) -> bool: ...
    def acquire(self, name: str, ttl_s: float) -> str | None: ...
    def release(self, name: str, token: str) -> bool: ...
    def lease_holder(self, name: str) -> str: ...
    def lock(self, name: str, ttl_s: float, wait_s: float) -> AbstractContextManager[str]: ...
    def outbox_add(self, job_id: str, url: str, body: dict[str, Any]) -> str: ...
    def outbox_claim(self, limit: int, lease_s: float) -> list[dict[str, Any]]: ...
    def outbox_retry(self, item_id: str, due: float, error: str) -> None: ...
    def outbox_done(self, item_id: str) -> None: ...
    def sweep_tmp(self, older_than_s: float = TMP_MAX_AGE_S) -> list[str]: ...
    def close(self) -> None: ...


class JobStore:
    """SQLite-backed jobs; safe to share between threads (one connection per thread)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.tmp_dir = self.data_dir / "tmp"
        for d in (self.data_dir, self.jobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "jobs.sqlite3"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job (ids are generated here, never taken from a request)."""
        return self.jobs_dir / uuid.UUID(job_id).hex

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def create(self, job_id: str, model: str, kind: str, n_utterances: int, callback_url: str | None = None) -> None:
        """Insert a queued job (its folder must already hold request.json)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, status, model, kind, created_at, updated_at, n_utterances, callback_url) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, model, kind, now, now, n_utterances, callback_url),
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job row as a dict (``result`` and ``error`` decoded), or None."""
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        for key in ("result", "error"):
            job[key] = json.loads(job[key]) if job[key] else None
        return job

    def status(self, job_id: str) -> str | None:
        row = self._db().execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row[0]

    def start(self, job_id: str) -> bool:
        """queued -> running, atomically; False if the job is gone or not queued."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, updated_at = ?, attempts = attempts + 1 "
                "WHERE id = ? AND status = ?",
                (RUNNING, now, now, job_id, QUEUED),
            )
        return cur.rowcount == 1

    def finish(self, job_id: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        """running -> succeeded (with ``result``) or failed (with ``error``); False if gone or not running.

        ``result`` must be finite JSON (ValueError otherwise: NaN would break every read)."""
        now = time.time()
        status = FAILED if error is not None else SUCCEEDED
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, result = ?, error = ? "
                "WHERE id = ? AND status = ?",
                (status, now, now, dumps(result), dumps(error), job_id, RUNNING),
            )
        return cur.rowcount == 1

    def update_result(
        self, job_id: str, result: dict[str, Any], n_utterances: int, expected_n: int | None = None
    ) -> bool:
        """Replace a succeeded job's result (appended utterances); with ``expected_n``, only if the
        stored conversation still has that many utterances (compare-and-set: no lost update)."""
        sql = "UPDATE jobs SET result = ?, n_utterances = ?, updated_at = ? WHERE id = ? AND status = ?"
        args: tuple[Any, ...] = (dumps(result), n_utterances, time.time(), job_id, SUCCEEDED)
        if expected_n is not None:
            sql, args = sql + " AND n_utterances = ?", (*args, expected_n)
        with self._tx() as db:
            cur = db.execute(sql, args)
        return cur.rowcount == 1

    def next_queued(self) -> str | None:
        """The oldest queued job id (start() it before running it)."""
        row = (
            self._db().execute("SELECT id FROM jobs WHERE status = ? ORDER BY created_at LIMIT 1", (QUEUED,)).fetchone()
        )
        return None if row is None else row[0]

    def depth(self) -> dict[str, int]:
        """Number of jobs per status."""
        rows = self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def pending(self) -> int:
        """Queued plus running jobs (what the queue limit counts)."""
        row = self._db().execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)).fetchone()
        return int(row[0])

    def recover(self, max_attempts: int) -> dict[str, list[str]]:
        """After a crash: running jobs go back to the queue, or fail once tried ``max_attempts`` times."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
            requeued = [r["id"] for r in rows if r["attempts"] < max_attempts]
            failed = [r["id"] for r in rows if r["attempts"] >= max_attempts]
            for job_id in requeued:
                db.execute("UPDATE jobs SET status = ?, updated_at = ? WHERE id = ?", (QUEUED, now, job_id))
            error = {
                "type": "urn:merc:problem:interrupted",
                "title": "Job interrupted",
                "detail": f"the service stopped while this job was running ({max_attempts} attempts)",
            }
            for job_id in failed:
                db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, error = ? WHERE id = ?",
                    (FAILED, now, now, json.dumps(error), job_id),
                )
        return {"requeued": requeued, "failed": failed}

    def expired(self, retention_s: float) -> list[str]:
        """Ids of jobs finished more than ``retention_s`` seconds ago (see service.jobs.retention)."""
        cutoff = time.time() - retention_s
        rows = (
            self._db()
            .execute("SELECT id FROM jobs WHERE status IN (?, ?) AND finished_at < ?", (SUCCEEDED, FAILED, cutoff))
            .fetchall()
        )
        return [r[0] for r in rows]

    def delete(self, job_id: str) -> bool:
        """Remove the row and the job's folder (media, features); False if unknown."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return cur.rowcount == 1

    # ------------------------------------------------------------ leases (locks that expire)

    def acquire(self, name: str, ttl_s: float) -> str | None:
        """Take the lease ``name`` for ``ttl_s`` seconds: its token, or None while someone else holds it.

        The token names its holder (host and process id): a lease whose process is gone (killed,
        crashed) no longer blocks anyone, whatever its ttl."""
        token, now = f"{uuid.uuid4().hex} {_HOST} {os.getpid()}", time.time()
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND expires <= ?", (name, now))
            row = db.execute("SELECT token FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and not _process_alive(row[0]):
                db.execute("DELETE FROM leases WHERE name = ? AND token = ?", (name, row[0]))
            cur = db.execute("INSERT OR IGNORE INTO leases VALUES (?, ?, ?)", (name, token, now + ttl_s))
        return token if cur.rowcount == 1 else None

    def lease_holder(self, name: str) -> str:
        """Who holds the lease ``name`` ('host:pid'; '' if free or unknown)."""
        row = self._db().execute("SELECT token FROM leases WHERE name = ?", (name,)).fetchone()
        parts = row[0].split() if row else []
        return f"{parts[1]}:{parts[2]}" if len(parts) == 3 else ""

    def release(self, name: str, token: str) -> bool:
        """Give the lease back (only its holder can); False if it had expired or was taken over."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM leases WHERE name = ? AND token = ?", (name, token))
        return cur.rowcount == 1

    def lock(self, name: str, ttl_s: float, wait_s: float) -> AbstractContextManager[str]:
        """``with store.lock(name, ttl_s, wait_s):`` one holder at a time across processes; Busy after ``wait_s``."""
        return hold_lease(self, name, ttl_s, wait_s)

    # ------------------------------------------------------------ the callback outbox

    def outbox_add(self, job_id: str, url: str, body: dict[str, Any]) -> str:
        """Queue one POST of ``body`` to ``url``, due now (delivered by service.jobs.callbacks.Deliverer)."""
        item_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute(
                "INSERT INTO outbox (id, job_id, url, body, due) VALUES (?, ?, ?, ?, ?)",
                (item_id, job_id, url, dumps(body), time.time()),
            )
        return item_id

    def outbox_claim(self, limit: int, lease_s: float) -> list[dict[str, Any]]:
        """Up to ``limit`` due deliveries, hidden from other deliverers for ``lease_s`` seconds."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT * FROM outbox WHERE due <= ? ORDER BY due LIMIT ?", (now, limit)).fetchall()
            for r in rows:
                db.execute("UPDATE outbox SET due = ?, attempts = attempts + 1 WHERE id = ?", (now + lease_s, r["id"]))
        return [{**dict(r), "attempts": r["attempts"] + 1, "body": json.loads(r["body"])} for r in rows]

    def outbox_retry(self, item_id: str, due: float, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET due = ?, last_error = ? WHERE id = ?", (due, error[:500], item_id))

    def outbox_done(self, item_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def outbox_size(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # ------------------------------------------------------------ files

    def sweep_tmp(self, older_than_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Remove uploads left in tmp/ by a crashed request (not written to for ``older_than_s``)."""
        return sweep_tmp_dir(self.tmp_dir, older_than_s)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _process_alive(token: str) -> bool:
    """Whether the process named in a lease token still runs (True when it cannot be told:
    another host, or a token without holder; then only the lease's expiry frees it)."""
    parts = token.split()
    if len(parts) != 3 or parts[1] != _HOST or not parts[2].isdigit():
        return True
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def hold_lease(store: Any, name: str, ttl_s: float, wait_s: float, poll_s: float = 0.02) -> Iterator[str]:
    """Acquire ``name`` on ``store`` (polling up to ``wait_s``), yield its token, release it.
    Busy names the live holder it waited on."""
    deadline = time.monotonic() + wait_s
    while (token := store.acquire(name, ttl_s)) is None:
        if time.monotonic() >= deadline:
            raise Busy(name, store.lease_holder(name), wait_s)
        time.sleep(poll_s)
    try:
        yield token
    finally:
        store.release(name, token)


def sweep_tmp_dir(tmp_dir: Path, older_than_s: float) -> list[str]:
    cutoff, removed = time.time() - older_than_s, []
    for path in tmp_dir.iterdir() if tmp_dir.is_dir() else ():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:  # removed by its request (or another sweeper) meanwhile
            continue
    return removed


def dumps(value: Any) -> str | None:
    """JSON text of ``value`` (None stays None); ValueError for NaN or infinity."""
    return None if value is None else json.dumps(value, allow_nan=False)
