"""One contract for both job stores (issue 12, item 13): the SQLite ``JobStore`` and the Redis
``RedisJobStore`` (against a real redis-server; those cases skip when it is not installed)
behave the same for transitions, the append compare-and-set, leases, the callback outbox,
retention and tmp sweeping. Leases are exclusive across processes, not just threads."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import pytest

from service.jobs.redis_store import RedisJobStore
from service.jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Busy, JobStore, JobStoreProtocol

KINDS = ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(not shutil.which("redis-server"), reason="no redis"))]


def open_store(kind: str, data: Path, url: str | None, prefix: str) -> JobStoreProtocol:
    return JobStore(data) if kind == "sqlite" else RedisJobStore(url, data, prefix=prefix)


@pytest.fixture(params=KINDS)
def spec(request, tmp_path: Path) -> tuple[str, Path, str | None, str]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return request.param, tmp_path / "data", url, f"c{time.monotonic_ns()}:"


@pytest.fixture
def store(spec) -> JobStoreProtocol:
    s = open_store(*spec)
    yield s
    s.close()


def queued(store: JobStoreProtocol, n: int = 2) -> str:
    job_id = store.new_id()
    store.job_dir(job_id).mkdir(parents=True)
    (store.job_dir(job_id) / "request.json").write_text("{}")
    store.create(job_id, "sdt-meld7", "text", n)
    return job_id


def test_it_is_a_job_store(store) -> None:
    assert isinstance(store, JobStoreProtocol)


def test_transitions(store) -> None:
    job_id = queued(store)
    assert store.status(job_id) == QUEUED and store.next_queued() == job_id and store.pending() == 1
    assert store.finish(job_id, result={"x": 1}) is False  # only a running job can finish
    assert store.start(job_id) and not store.start(job_id)
    assert store.depth()[RUNNING] == 1
    assert store.finish(job_id, result={"utterances": []})
    assert store.finish(job_id, error={"detail": "late"}) is False  # finished once
    job = store.get(job_id)
    assert (job["status"], job["attempts"], job["result"], job["error"]) == (SUCCEEDED, 1, {"utterances": []}, None)
    other = queued(store)
    store.start(other)
    assert store.finish(other, error={"type": "t", "title": "x", "detail": "d"})
    assert store.get(other)["status"] == FAILED and store.get(other)["result"] is None


def test_non_finite_results_are_never_stored(store) -> None:
    job_id = queued(store)
    store.start(job_id)
    with pytest.raises(ValueError):
        store.finish(job_id, result={"distribution": {"joy": float("nan")}})
    assert store.status(job_id) == RUNNING  # still running: the caller fails it with a reason
    assert store.finish(job_id, error={"detail": "non-finite"})


def test_update_result_is_a_compare_and_set(store) -> None:
    job_id = queued(store, n=2)
    store.start(job_id)
    store.finish(job_id, result={"n": 2})
    assert store.update_result(job_id, {"n": 3}, 3, expected_n=2)
    assert store.update_result(job_id, {"n": 3, "lost": True}, 3, expected_n=2) is False  # someone won
    job = store.get(job_id)
    assert job["n_utterances"] == 3 and job["result"] == {"n": 3}
    assert store.update_result(job_id, {"n": 4}, 4, expected_n=3) and store.get(job_id)["result"] == {"n": 4}


def test_leases_expire_and_only_the_holder_releases(store) -> None:
    token = store.acquire("conversation:a", ttl_s=0.3)
    assert token and store.acquire("conversation:a", ttl_s=5) is None
    assert store.acquire("conversation:b", ttl_s=5)  # independent names
    assert store.release("conversation:a", "not-the-token") is False
    time.sleep(0.4)
    assert store.acquire("conversation:a", ttl_s=5)  # expired: free again
    assert store.release("conversation:a", token) is False  # the old holder cannot free the new one
    with pytest.raises(Busy), store.lock("conversation:a", ttl_s=5, wait_s=0.1):
        pass


def _count_under_lock(spec: tuple, counter: str, n: int) -> None:
    store = open_store(*spec)
    for _ in range(n):
        with store.lock("conversation:counter", ttl_s=10, wait_s=30):
            value = int(Path(counter).read_text())
            time.sleep(0.002)  # widen the window a lost update needs
            Path(counter).write_text(str(value + 1))
    store.close()


def test_a_lock_is_exclusive_across_processes(spec, tmp_path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    open_store(*spec).close()  # create the schema once
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_under_lock, args=(spec, str(counter), 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "75"


def _hold_until_killed(spec: tuple, ready: str) -> None:
    """A worker process that takes a conversation's lease for ten minutes, beating while it lives."""
    import threading

    store = open_store(*spec)
    store.worker_name = "w-held@h"
    if isinstance(store, RedisJobStore):
        threading.Thread(target=_beat, args=(store,), daemon=True).start()
        time.sleep(0.2)
    assert store.acquire("conversation:held", ttl_s=600)
    Path(ready).write_text("held")
    time.sleep(600)


def _beat(store: RedisJobStore) -> None:
    while True:
        store.beat(store.worker_name, ttl_s=2)  # wide: beats lapse on a loaded host
        time.sleep(0.2)


def test_the_lease_of_a_killed_holder_blocks_nobody(spec, tmp_path) -> None:
    """Issue 21 F6: a worker killed inside an append leaves its conversation lease behind (ttl:
    the job's time limit + 60 s); the append run again must take it at once, not wait that out
    and fail as conversation-busy. While the holder lives, Busy names it."""
    open_store(*spec).close()  # create the schema once
    ready = tmp_path / "ready"
    holder = mp.get_context("spawn").Process(target=_hold_until_killed, args=(spec, str(ready)))
    holder.start()
    store = open_store(*spec)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and holder.is_alive():
            time.sleep(0.05)
        with pytest.raises(Busy) as busy, store.lock("conversation:held", ttl_s=5, wait_s=0.2):
            pass
        expected = "w-held@h" if spec[0] == "redis" else f":{holder.pid}"
        assert expected in busy.value.holder and expected in str(busy.value)
        holder.kill()  # SIGKILL: nothing is released
        holder.join(10)
        time.sleep(2.1)  # its heartbeat expires (Redis); its process is gone (SQLite)
        started = time.monotonic()
        with store.lock("conversation:held", ttl_s=5, wait_s=2):
            assert time.monotonic() - started < 1
    finally:
        holder.kill()
        store.close()


def test_outbox_claims_retries_and_persists(store, spec) -> None:
    first = store.outbox_add("job-1", "https://example.org/hook", {"id": "job-1", "status": "succeeded"})
    claimed = store.outbox_claim(limit=10, lease_s=30)
    assert [(c["id"], c["attempts"], c["body"]["status"]) for c in claimed] == [(first, 1, "succeeded")]
    assert store.outbox_claim(limit=10, lease_s=30) == []  # leased to the first claimer
    store.outbox_retry(first, due=time.time() - 1, error="503 from the hook")
    reopened = open_store(*spec)  # another process on the same store sees the entry
    again = reopened.outbox_claim(limit=10, lease_s=30)
    assert [(c["id"], c["attempts"]) for c in again] == [(first, 2)]
    reopened.outbox_done(first)
    assert store.outbox_size() == 0 and store.outbox_claim(limit=10, lease_s=30) == []
    reopened.close()


def test_retention_delete_and_tmp_sweep(store) -> None:
    done, running = queued(store), queued(store)
    for job_id in (done, running):
        store.start(job_id)
    store.finish(done, result={"utterances": []})
    time.sleep(0.3)
    assert store.expired(0.2) == [done]
    assert store.delete(done) and store.get(done) is None and not store.job_dir(done).exists()
    assert store.delete(done) is False
    stale, fresh = store.tmp_dir / "a.upload", store.tmp_dir / "b.upload"
    stale.write_text("x")
    fresh.write_text("y")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_tmp(older_than_s=600) == ["a.upload"] and fresh.exists()
    assert json.loads((store.job_dir(running) / "request.json").read_text()) == {}
