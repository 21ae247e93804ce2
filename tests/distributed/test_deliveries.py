"""What a worker does with each delivery of a job id (service.jobs.celery_tasks.handle), on a real
Redis job store and the real job code: run it, recover it from a dead worker, defer it while
a live worker still runs it, or skip it when it is finished or deleted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from service.jobs.celery_tasks import StillRunning, handle
from service.jobs.redis_store import RedisJobStore
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sdt-meld7"


@pytest.fixture
def store(redis_url: str, tmp_path: Path) -> RedisJobStore:
    s = RedisJobStore(redis_url, tmp_path / "data", prefix=f"d{time.monotonic_ns()}:")
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", weights_dir=ROOT / "weights", default_model=MODEL, device="cpu", max_attempts=2
    )


def queued_job(store: RedisJobStore) -> str:
    job_id = store.new_id()
    store.job_dir(job_id).mkdir(parents=True)
    conv = {"id": "c", "utterances": [{"id": "u0", "speaker": "A", "text": "What a lovely surprise!"}]}
    (store.job_dir(job_id) / "request.json").write_text(json.dumps({"conversation": conv, "model": MODEL}))
    store.create(job_id, MODEL, "text", 1)
    return job_id


def running_on(store: RedisJobStore, job_id: str, worker: str, attempts: int) -> None:
    store.worker_name = worker
    for i in range(attempts):
        if i:
            store.requeue_lost(job_id, max_attempts=99)
        store.start(job_id)


@pytest.mark.skipif(not (ROOT / "weights" / MODEL).exists(), reason=f"bundle {MODEL} not present")
def test_a_queued_job_runs_and_records_its_worker(store: RedisJobStore, settings: Settings) -> None:
    job_id = queued_job(store)
    assert handle(job_id, "w1@h", settings, store) == "succeeded"
    job = store.get(job_id)
    assert job["worker"] == "w1@h" and job["attempts"] == 1
    assert job["result"]["utterances"][0]["emotion"] in job["result"]["labels"]
    assert handle(job_id, "w2@h", settings, store) == "succeeded"  # a duplicate delivery runs nothing
    assert store.get(job_id)["attempts"] == 1


def test_a_job_whose_worker_died_twice_fails_with_a_reason(store: RedisJobStore, settings: Settings) -> None:
    job_id = queued_job(store)
    running_on(store, job_id, "dead@h", attempts=2)
    assert handle(job_id, "w2@h", settings, store) == "failed"
    error = store.get(job_id)["error"]
    assert error["type"] == "urn:merc:problem:worker-lost" and "2 times" in error["detail"]


def test_a_job_still_running_on_a_live_worker_is_deferred(store: RedisJobStore, settings: Settings) -> None:
    job_id = queued_job(store)
    running_on(store, job_id, "busy@h", attempts=1)
    store.beat("busy@h", ttl_s=5)
    with pytest.raises(StillRunning):
        handle(job_id, "w2@h", settings, store)
    assert store.get(job_id)["status"] == "running" and store.get(job_id)["attempts"] == 1


def test_own_earlier_run_counts_as_lost(store: RedisJobStore, settings: Settings) -> None:
    """A worker restarted under the same name finds its own job running: that run died."""
    job_id = queued_job(store)
    running_on(store, job_id, "w1@h", attempts=2)
    store.beat("w1@h", ttl_s=5)
    assert handle(job_id, "w1@h", settings, store) == "failed"


def test_a_deleted_job_is_skipped(store: RedisJobStore, settings: Settings) -> None:
    job_id = queued_job(store)
    store.delete(job_id)
    assert handle(job_id, "w1@h", settings, store) is None
    assert store.get(job_id) is None and not store.job_dir(job_id).exists()


def test_importing_the_worker_loads_no_model_and_leaves_cuda_alone() -> None:
    """Models load in the worker's inference child (service.jobs.sandbox), never when Celery imports
    the tasks: the supervising process does not even import torch."""
    import subprocess
    import sys

    code = "import sys, service.jobs.celery_tasks; print('torch' in sys.modules)"
    env = {"MERC_QUEUE": "redis://127.0.0.1:1/0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


@pytest.mark.skipif(not (ROOT / "weights" / MODEL).exists(), reason=f"bundle {MODEL} not present")
def test_a_job_past_its_time_limit_is_stopped_and_the_next_delivery_runs(store: RedisJobStore, tmp_path) -> None:
    """Issue 12, item 11, on the code path of the Celery task: the job's child is killed at
    MERC_JOB_TIMEOUT_S, the job fails naming the limit, and the same worker runs the next job."""
    settings = Settings(
        data_dir=tmp_path / "data", weights_dir=ROOT / "weights", default_model=MODEL, device="cpu", job_timeout_s=3
    )
    slow = store.new_id()
    store.job_dir(slow).mkdir(parents=True)
    texts = [f"sentence {i} about the weather, the {i % 7} dogs and tomorrow's plans" for i in range(1500)]
    conv = {
        "id": "slow",
        "utterances": [{"id": f"u{i}", "speaker": "AB"[i % 2], "text": t} for i, t in enumerate(texts)],
    }
    (store.job_dir(slow) / "request.json").write_text(json.dumps({"conversation": conv, "model": MODEL}))
    store.create(slow, MODEL, "text", len(texts))
    assert handle(slow, "w1@h", settings, store) == "failed"
    job = store.get(slow)
    assert job["error"]["type"] == "urn:merc:problem:job-timeout", job["error"]
    assert "MERC_JOB_TIMEOUT_S (3 s)" in job["error"]["detail"]
    assert job["finished_at"] - job["started_at"] < 3 + 3  # stopped at the limit, not when the work ended
    nxt = queued_job(store)
    assert handle(nxt, "w1@h", settings, store) == "succeeded"
    assert store.get(nxt)["result"]["utterances"][0]["emotion"]
