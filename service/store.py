"""The job store: one SQLite file plus one folder per job under the data directory.

Layout of ``MERC_DATA_DIR``::

    jobs.sqlite3            job rows: status, model, times, attempts, error, result JSON
    jobs/<id>/request.json  the validated conversation, model, media descriptions
    jobs/<id>/video.<ext>   uploaded media, named by sniffed content (never the upload name)
    jobs/<id>/audio.<ext>
    jobs/<id>/features.npz  per-utterance features of the conversation (for appended turns)
    tmp/                    uploads while they stream in (removed on every path)

Any process may open the store (WAL mode): the API, in-process worker threads, or
separate worker processes (issue #5). Status moves queued -> running -> succeeded | failed;
``start`` is atomic, so two workers never run the same job.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)

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
"""


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
        """running -> succeeded (with ``result``) or failed (with ``error``); False if the job is gone."""
        now = time.time()
        status = FAILED if error is not None else SUCCEEDED
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, updated_at = ?, result = ?, error = ? WHERE id = ?",
                (status, now, now, _dumps(result), _dumps(error), job_id),
            )
        return cur.rowcount == 1

    def update_result(self, job_id: str, result: dict[str, Any], n_utterances: int) -> bool:
        """Replace a finished job's result (appended utterances)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET result = ?, n_utterances = ?, updated_at = ? WHERE id = ? AND status = ?",
                (_dumps(result), n_utterances, time.time(), job_id, SUCCEEDED),
            )
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
        """Ids of jobs finished more than ``retention_s`` seconds ago (see service.retention)."""
        cutoff = time.time() - retention_s
        rows = self._db().execute(
            "SELECT id FROM jobs WHERE status IN (?, ?) AND finished_at < ?", (SUCCEEDED, FAILED, cutoff)
        ).fetchall()
        return [r[0] for r in rows]

    def delete(self, job_id: str) -> bool:
        """Remove the row and the job's folder (media, features); False if unknown."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return cur.rowcount == 1

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
