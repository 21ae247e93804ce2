"""Jobs and results survive a restart; a job running when the process died is re-queued
(or failed after MERC_MAX_ATTEMPTS), never left running; a full queue answers 429."""

from __future__ import annotations

import random
import time

import pytest

from service.jobs.store import FAILED, QUEUED, SUCCEEDED, JobStore
from tests.api.conftest import assert_problem, conversation

WORDS = [
    "we",
    "you",
    "they",
    "never",
    "always",
    "maybe",
    "really",
    "want",
    "need",
    "love",
    "hate",
    "the",
    "old",
    "red",
    "house",
    "car",
    "dog",
    "tomorrow",
]


def long_conversation(n: int, seed: int) -> dict:
    """Uncached, distinct sentences: encoding them keeps the worker busy for seconds."""
    rng = random.Random(seed)
    return {
        "utterances": [
            {"speaker": "AB"[i % 2], "text": " ".join(rng.choice(WORDS) for _ in range(14)) + f" ({seed}.{i})"}
            for i in range(n)
        ]
    }


def wait_status(client, job_id: str, wanted: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/conversations/{job_id}").json()
        if job["status"] in wanted:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def test_restart_with_a_job_in_flight(server_factory, tmp_path):
    data = tmp_path / "data"
    first = server_factory(data, MERC_MAX_QUEUE="3")
    with first.client() as client:
        done = client.post("/v1/conversations", json=conversation(3)).json()
        assert done["status"] == SUCCEEDED
        running = client.post("/v1/conversations", params={"wait": 0}, json=long_conversation(400, 1)).json()
        queued = client.post("/v1/conversations", params={"wait": 0}, json=long_conversation(20, 2)).json()
        third = client.post("/v1/conversations", params={"wait": 0}, json=conversation(2, "Third: ")).json()
        body = assert_problem(client.post("/v1/conversations", json=conversation(2)), 429)
        assert "limit 3" in body["detail"]
        assert wait_status(client, running["id"], {"running", SUCCEEDED})["status"] == "running"
        assert client.get(f"/v1/conversations/{queued['id']}").json()["status"] == QUEUED
    first.kill()

    second = server_factory(data)
    with second.client() as client:
        after = client.get(f"/v1/conversations/{done['id']}").json()
        assert after["status"] == SUCCEEDED and after["result"] == done["result"]
        for job in (running, queued, third):
            finished = wait_status(client, job["id"], {SUCCEEDED, FAILED})
            assert finished["status"] == SUCCEEDED, finished
            assert len(finished["result"]["utterances"]) == job["n_utterances"]
        assert client.get(f"/v1/conversations/{running['id']}").json()["attempts"] == 2
        assert client.get("/readyz").json()["queue"]["running"] == 0


def test_recover_fails_a_job_after_max_attempts(tmp_path):
    store = JobStore(tmp_path)
    for job_id, attempts in (("00000000-0000-4000-8000-000000000001", 1), ("00000000-0000-4000-8000-000000000002", 2)):
        store.create(job_id, "dmd-meld7", "text", 1)
        for _ in range(attempts):
            store._db().execute("UPDATE jobs SET status = ? WHERE id = ?", (QUEUED, job_id))
            assert store.start(job_id)
    got = store.recover(max_attempts=2)
    assert got == {
        "requeued": ["00000000-0000-4000-8000-000000000001"],
        "failed": ["00000000-0000-4000-8000-000000000002"],
    }
    assert store.status("00000000-0000-4000-8000-000000000001") == QUEUED
    failed = store.get("00000000-0000-4000-8000-000000000002")
    assert failed["status"] == FAILED and "stopped while this job was running" in failed["error"]["detail"]
    assert store.pending() == 1


@pytest.mark.parametrize("status", [SUCCEEDED, FAILED])
def test_start_is_atomic(tmp_path, status):
    store = JobStore(tmp_path)
    job_id = store.new_id()
    store.create(job_id, "dmd-meld7", "text", 1)
    assert store.start(job_id) and not store.start(job_id)
    store.finish(
        job_id,
        result={"ok": 1} if status == SUCCEEDED else None,
        error=None if status == SUCCEEDED else {"detail": "x"},
    )
    assert store.status(job_id) == status and not store.start(job_id)
