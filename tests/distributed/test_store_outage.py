"""Issue 21 F4: the API in distributed mode while its Redis is stopped (SIGSTOP: every command
times out) or gone (connection refused): every route answers 503 problem+json with Retry-After,
never 500; the job accepted before is still there when Redis is back, and service resumes at once.

A real ``redis-server`` and ``merc serve`` (MERC_QUEUE); no worker is needed. Skips without redis-server.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.distributed.conftest import needs_redis
from tests.local_cluster import LocalCluster, Proc, merc_command, sample_conversation, wait_until

pytestmark = [needs_redis]
ROUTES = ("/readyz", "/metrics", "/v1/conversations/{id}", "POST /v1/conversations")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("outage"), workers=0, MERC_REDIS_TIMEOUT_S="1")
    try:
        c.start_redis()
        cmd = merc_command("serve", "--host", "127.0.0.1", "--port", str(c.api_port), "--log-level", "warning")
        c.api = Proc("api", cmd, c.env, c.logs).start()
        wait_until(lambda: httpx.get(f"{c.api_url}/healthz", timeout=2).status_code == 200, 120, "API", c.api)
        yield c
    finally:
        c.stop()


def answers(api: httpx.Client, job_id: str) -> dict[str, httpx.Response]:
    out = {}
    for route in ROUTES:
        if route.startswith("POST"):
            out[route] = api.post("/v1/conversations", params={"wait": 0}, json=sample_conversation(2, tag="outage"))
        else:
            out[route] = api.get(route.format(id=job_id))
    return out


def assert_unavailable(responses: dict[str, httpx.Response]) -> None:
    for route, r in responses.items():
        assert r.status_code == 503, (route, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), route
        assert int(r.headers["retry-after"]) > 0, route
        body = r.json()
        assert body["status"] == 503 and "Redis" in body["detail"], body


def test_a_stopped_then_a_gone_redis_answers_503_and_loses_no_accepted_job(cluster: LocalCluster) -> None:
    with httpx.Client(base_url=cluster.api_url, timeout=30) as api:
        accepted = api.post("/v1/conversations", params={"wait": 0}, json=sample_conversation(3, tag="kept"))
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]

        cluster.redis.proc.send_signal(signal.SIGSTOP)  # stopped: connections open, nothing answered
        try:
            started = time.monotonic()
            assert_unavailable(answers(api, job_id))
            assert time.monotonic() - started < 4 * 10  # each within the 1 s Redis timeout, a few calls deep
        finally:
            cluster.redis.proc.send_signal(signal.SIGCONT)
        assert api.get(f"/v1/conversations/{job_id}").json()["status"] == "queued"

        cluster.redis.stop()  # gone: connection refused
        assert_unavailable(answers(api, job_id))
        ready = api.get("/readyz").json()
        assert ready["checks"]["store_reachable"] is False, ready

        cluster.start_redis()  # back, from its append-only file
        job = api.get(f"/v1/conversations/{job_id}")
        assert job.status_code == 200 and job.json()["status"] == "queued", job.text
        assert api.get("/metrics").status_code == 200
        assert api.get("/readyz").json()["checks"] == {"workers_alive": False, "default_model_available": True}
