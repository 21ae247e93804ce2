"""Retention with the SQLite store of ``merc serve`` (no queue): the same sweep as distributed mode."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from service.jobs.retention import sweep_expired
from service.jobs.store import JobStore

ROOT = Path(__file__).resolve().parents[2]


def test_sqlite_store_sweep_deletes_only_jobs_past_retention(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = []
    for _ in range(3):
        job_id = store.new_id()
        store.job_dir(job_id).mkdir(parents=True)
        store.create(job_id, "sdt-meld7", "text", 1)
        ids.append(job_id)
    old, new, queued = ids
    for job_id in (old, new):
        store.start(job_id)
    store.finish(old, result={"utterances": []})
    time.sleep(0.3)
    store.finish(new, error={"type": "x", "title": "t", "detail": "d"})
    assert sweep_expired(store, retention_s=0.2) == [old]
    assert store.get(old) is None and not store.job_dir(old).exists()
    assert store.get(new)["status"] == "failed" and store.get(queued)["status"] == "queued"


def test_merc_worker_needs_a_queue(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert out.returncode == 2 and "MERC_QUEUE" in out.stderr
