"""The Redis job store against a real redis-server: transitions, attempts, retention, deletion."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from service.gpu import claim_slot, renew_slot
from service.jobs.redis_store import RedisJobStore
from service.jobs.store import FAILED, QUEUED, RUNNING, SUCCEEDED


@pytest.fixture
def store(redis_url: str, tmp_path: Path) -> RedisJobStore:
    s = RedisJobStore(redis_url, tmp_path / "data", prefix=f"t{time.monotonic_ns()}:")
    yield s
    s.close()


def _job(store: RedisJobStore) -> str:
    job_id = store.new_id()
    store.job_dir(job_id).mkdir(parents=True)
    (store.job_dir(job_id) / "request.json").write_text("{}")
    store.create(job_id, "dmd-meld7", "text", 2)
    return job_id


def test_start_is_atomic_and_counts_attempts(store: RedisJobStore) -> None:
    job_id = _job(store)
    store.worker_name = "w1@host"
    assert store.start(job_id) is True
    assert store.start(job_id) is False  # a second worker cannot take it
    job = store.get(job_id)
    assert (job["status"], job["attempts"], job["worker"]) == (RUNNING, 1, "w1@host")
    assert store.depth() == {QUEUED: 0, RUNNING: 1, SUCCEEDED: 0, FAILED: 0}
    assert store.pending() == 1


def test_result_lives_on_the_shared_volume(store: RedisJobStore) -> None:
    job_id = _job(store)
    store.start(job_id)
    assert store.finish(job_id, result={"utterances": [{"emotion": "joy"}]})
    assert json.loads((store.job_dir(job_id) / "result.json").read_text())["utterances"][0]["emotion"] == "joy"
    assert "joy" not in json.dumps(store.redis.hgetall(store._key(job_id)))  # by reference only
    job = store.get(job_id)
    assert job["status"] == SUCCEEDED and job["result"]["utterances"][0]["emotion"] == "joy"
    assert isinstance(job["finished_at"], float) and job["error"] is None


def test_lost_worker_requeues_then_fails_with_a_reason(store: RedisJobStore) -> None:
    job_id = _job(store)
    store.start(job_id)
    assert store.requeue_lost(job_id, max_attempts=2) == QUEUED
    assert store.start(job_id)  # second attempt
    assert store.requeue_lost(job_id, max_attempts=2) == FAILED
    job = store.get(job_id)
    assert job["status"] == FAILED and job["attempts"] == 2
    assert job["error"]["type"] == "urn:merc:problem:worker-lost" and "2 times" in job["error"]["detail"]


def test_delete_reaches_the_record_the_indexes_and_the_files(store: RedisJobStore) -> None:
    job_id = _job(store)
    store.start(job_id)
    store.finish(job_id, result={"x": 1})
    assert store.delete(job_id)
    assert store.get(job_id) is None and not store.job_dir(job_id).exists()
    assert sum(store.depth().values()) == 0 and store.expired(0) == []
    assert store.finish(job_id, result={"x": 2}) is False  # a worker finishing late recreates nothing
    assert not store.job_dir(job_id).exists() and store.get(job_id) is None


def test_retention_lists_only_jobs_finished_long_enough_ago(store: RedisJobStore) -> None:
    old, new, running = _job(store), _job(store), _job(store)
    for job_id in (old, new, running):
        store.start(job_id)
    store.finish(old, error={"type": "x", "title": "t", "detail": "d"})
    time.sleep(0.3)
    store.finish(new, result={})
    assert store.expired(0.2) == [old]
    assert set(store.expired(0)) == {old, new}


def test_undispatched_finds_jobs_the_broker_never_got(store: RedisJobStore) -> None:
    sent, stranded = _job(store), _job(store)
    store.mark_dispatched(sent)
    assert store.undispatched(0) == [stranded]
    assert store.undispatched(3600) == []


def test_liveness_expires(store: RedisJobStore) -> None:
    store.beat("w1", ttl_s=0.3)
    assert store.alive("w1") and not store.alive("w2") and not store.alive("")
    time.sleep(0.5)
    assert not store.alive("w1")


def test_gpu_claims_give_each_worker_its_own_gpu(store: RedisJobStore) -> None:
    r, uuids = store.redis, ["GPU-a", "GPU-b"]
    prefix = store.prefix + "gpu:"
    assert claim_slot(r, uuids, "w1", 5, prefix) == 0
    assert claim_slot(r, uuids, "w2", 5, prefix) == 1
    assert claim_slot(r, uuids, "w1", 5, prefix) == 0  # a worker keeps its claim
    assert claim_slot(r, uuids, "w3", 5, prefix) is None
    assert renew_slot(r, "GPU-a", "w1", 5, prefix) and not renew_slot(r, "GPU-b", "w1", 5, prefix)
    r.delete(prefix + "GPU-b")  # w2's claim expired (w2 died)
    assert claim_slot(r, uuids, "w3", 5, prefix) == 1


def test_sweep_deletes_expired_jobs_with_their_files(store: RedisJobStore) -> None:
    from service.jobs.retention import sweep_expired

    done, running = _job(store), _job(store)
    for job_id in (done, running):
        store.start(job_id)
    store.finish(done, result={"utterances": []})
    time.sleep(0.3)
    assert sweep_expired(store, retention_s=3600) == []
    assert sweep_expired(store, retention_s=0.2) == [done]
    assert store.get(done) is None and not store.job_dir(done).exists()
    assert store.get(running)["status"] == RUNNING and store.job_dir(running).exists()


def test_jobs_of_a_dead_or_restarted_worker_are_requeued_then_failed(store: RedisJobStore) -> None:
    """Issue 21 F5: a running job whose worker's heartbeat expired leaves ``running`` at once
    (not at the broker's visibility timeout); so does one whose worker restarted under the same
    name (another run); a job of a live worker stays."""
    dead, restarted, live = _job(store), _job(store), _job(store)
    for job_id, worker in ((dead, "dead@h"), (restarted, "w2@h"), (live, "w3@h")):
        store.worker_name = worker
        store.start(job_id)
    later_run = RedisJobStore(store.url, store.data_dir, prefix=store.prefix)  # w2@h, started again
    later_run.beat("w2@h", ttl_s=30)
    store.beat("w3@h", ttl_s=30)
    store.beat("dead@h", ttl_s=2)  # dies now: its beat lapses in 2 s (wide: a loaded host is slow)
    assert store.recover_lost(max_attempts=2) == {"requeued": [restarted], "failed": []}
    time.sleep(2.1)
    assert sorted(store.recover_lost(max_attempts=2)["requeued"]) == [dead]
    assert store.status(live) == RUNNING and store.status(dead) == QUEUED
    store.worker_name = "dead@h"
    store.start(dead)  # second attempt, on a worker that dies too
    assert store.recover_lost(max_attempts=2) == {"requeued": [], "failed": [dead]}
    error = store.get(dead)["error"]
    assert error["type"] == "urn:merc:problem:worker-lost" and "2 times" in error["detail"], error
    assert store.expired(0) == [dead]  # finished: retention applies
    later_run.close()


def test_the_lost_job_watch_waits_a_heartbeat_ttl_after_redis_was_away(store: RedisJobStore) -> None:
    """After an outage every live worker's beat may have lapsed: nothing is judged lost until
    Redis has answered for a whole TTL (time for live workers to beat again)."""
    from service.jobs.celery_app import LostJobs

    job_id = _job(store)
    store.worker_name = "gone@h"
    store.start(job_id)
    sent: list[str] = []
    watch = LostJobs(store, max_attempts=3, ttl_s=2, send=lambda _store, job_id: sent.append(job_id))
    assert watch.step() == {"requeued": [], "failed": []}  # first look: wait a TTL
    assert store.status(job_id) == RUNNING
    time.sleep(0.8)
    assert watch.step()["requeued"] == []
    time.sleep(1.4)
    assert watch.step()["requeued"] == [job_id]
    assert store.status(job_id) == QUEUED and sent == [job_id]  # and sent to the workers again
