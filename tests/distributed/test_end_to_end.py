"""docker-compose.yml's services as local processes: a real redis-server, ``merc serve`` in
distributed mode (MERC_QUEUE) and two ``merc worker`` processes (Celery, solo pool).

Twenty jobs (text and uploaded audio) all succeed, spread over both workers; the API is
killed and restarted without losing a job; DELETE removes every copy; a worker killed
mid-job leaves its job completed by the other worker or failed with a reason, and no job
lost or stuck. Skips when redis-server is not installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.distributed.conftest import needs_redis
from tests.local_cluster import ROOT, LocalCluster, sample_conversation, sample_wav

MODEL = "sdt-meld7"  # a MiniLM bundle: the fastest text encoder keeps the test short
pytestmark = [
    needs_redis,
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "weights" / MODEL).exists(), reason=f"bundle {MODEL} not present"),
]
TERMINAL = ("succeeded", "failed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {"MERC_VISIBILITY_TIMEOUT_S": "3", "MERC_HEARTBEAT_S": "0.5", "MERC_MAX_ATTEMPTS": "2"}
    env["MERC_DEFAULT_MODEL"] = env["MERC_DEFAULT_MEDIA_MODEL"] = MODEL  # audio jobs too: one bundle to load
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, ready_timeout=600, **env) as c:
        yield c


def submit_text(api: httpx.Client, n: int = 40) -> str:
    r = api.post("/v1/conversations", params={"wait": 0}, json=sample_conversation(n))
    assert r.status_code in (200, 202), r.text
    return r.json()["id"]


def submit_audio(api: httpx.Client, n: int = 4) -> str:
    transcript = json.dumps(sample_conversation(n, span_s=1.8))
    files = {"audio": ("talk.wav", sample_wav(2.0), "audio/wav"), "transcript": (None, transcript)}
    r = api.post("/v1/conversations", params={"wait": 0}, files=files)
    assert r.status_code in (200, 202), r.text
    return r.json()["id"]


def wait_all(api: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll until every job is succeeded or failed; fail listing the stuck ones after ``timeout``."""
    deadline, jobs = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        jobs = {i: api.get(f"/v1/conversations/{i}").json() for i in ids}
        if all(j["status"] in TERMINAL for j in jobs.values()):
            return jobs
        time.sleep(0.3)
    stuck = {i: j["status"] for i, j in jobs.items() if j["status"] not in TERMINAL}
    raise AssertionError(f"jobs not finished after {timeout} s: {stuck}")


def jobs_done(cluster: LocalCluster, index: int) -> int:
    """merc_jobs_total{status="succeeded"} scraped from one worker's metrics port."""
    m = re.search(r'^merc_jobs_total\{status="succeeded"\} (\S+)$', cluster.worker_metrics(index), flags=re.M)
    return int(float(m.group(1))) if m else 0


def test_twenty_jobs_succeed_spread_over_both_workers(cluster: LocalCluster, api: httpx.Client, store) -> None:
    ids = [submit_audio(api) if i % 5 == 4 else submit_text(api) for i in range(20)]
    jobs = wait_all(api, ids, timeout=90)
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 20, [j["error"] for j in jobs.values()]
    assert all(len(j["result"]["utterances"]) == j["n_utterances"] for j in jobs.values())
    assert {j["media"]["audio"]["format"] for j in jobs.values() if j["media"]} == {"wav"}
    per_worker = [jobs_done(cluster, i) for i in range(2)]
    assert sum(per_worker) == 20 and min(per_worker) >= 1, per_worker
    assert len({store.get(i)["worker"] for i in ids}) == 2


def test_worker_logs_are_json_lines_carrying_the_job_id(cluster: LocalCluster, api: httpx.Client) -> None:
    job_id = submit_text(api, 3)
    wait_all(api, [job_id], timeout=30)
    lines = [json.loads(line) for w in cluster.workers for line in w.tail(10**6).splitlines() if line.startswith("{")]
    mine = [r for r in lines if r.get("job_id") == job_id]
    assert any(r["msg"].startswith("job succeeded") and r["logger"] == "merc.celery" for r in mine), mine
    assert any(r["logger"] == "celery.app.trace" for r in mine)  # Celery's own line, tagged too


def test_container_health_checks_pass_against_the_running_processes(cluster: LocalCluster) -> None:
    """The HEALTHCHECK commands of docker/Dockerfile.*, pointed at the local processes."""
    check = [sys.executable, "-m", "service.healthcheck"]
    worker = f"http://127.0.0.1:{cluster.metrics_ports[0]}/metrics"
    assert subprocess.run([*check, worker, "merc_worker_ready=1"], timeout=30).returncode == 0
    assert subprocess.run([*check, worker, "merc_worker_busy=7"], timeout=30).returncode == 1
    assert subprocess.run([*check, f"{cluster.api_url}/healthz"], timeout=30).returncode == 0
    assert subprocess.run([*check, f"{cluster.api_url}/nowhere"], timeout=30).returncode == 1


def test_api_restart_loses_nothing(cluster: LocalCluster, api: httpx.Client) -> None:
    ids = [submit_text(api, 40) for _ in range(6)]
    cluster.api.kill()  # SIGKILL while the jobs are queued or running
    cluster.start_api()
    jobs = wait_all(api, ids, timeout=60)
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 6


def test_delete_reaches_every_copy(cluster: LocalCluster, api: httpx.Client, store) -> None:
    job_id = submit_audio(api)
    wait_all(api, [job_id], timeout=30)
    folder = store.job_dir(job_id)
    assert (folder / "result.json").exists() and (folder / "audio.wav").exists()
    assert api.delete(f"/v1/conversations/{job_id}").status_code == 204
    assert api.get(f"/v1/conversations/{job_id}").status_code == 404
    assert not folder.exists()
    leftovers = [k for k in store.redis.scan_iter("*") if job_id in k]
    assert leftovers == []
    assert not any(job_id in str(m) for m in store.redis.zrange("merc:finished", 0, -1))


def test_killed_worker_leaves_no_job_lost_or_stuck(cluster: LocalCluster, api: httpx.Client, store) -> None:
    long_job = submit_text(api, 400)
    deadline = time.monotonic() + 30
    while store.status(long_job) != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.status(long_job) == "running"
    holder = store.get(long_job)["worker"]
    victim = next(i for i, w in enumerate(cluster.workers) if holder.startswith(f"w{i + 1}@"))
    others = [submit_text(api, 3) for _ in range(5)]
    cluster.workers[victim].kill()  # SIGKILL mid-job: the message is never acknowledged
    jobs = wait_all(api, [long_job, *others], timeout=240)  # the 400 turns run again on a loaded host
    assert all(j["status"] == "succeeded" for i, j in jobs.items() if i != long_job)
    job = jobs[long_job]
    if job["status"] == "succeeded":
        assert job["attempts"] == 2 and len(job["result"]["utterances"]) == 400
        assert store.get(long_job)["worker"] != holder
    else:
        assert job["error"]["type"] == "urn:merc:problem:worker-lost", job["error"]
    assert store.depth()["queued"] == 0 and store.depth()["running"] == 0


def test_parallel_appends_through_two_api_processes_keep_every_turn_once(cluster: LocalCluster, api) -> None:
    """Issue 12: ids and the duplicate check are decided under a lease in Redis, so two API
    replicas (and two workers) appending to one conversation at once lose no turn."""
    from tests.local_cluster import Proc, merc_command, wait_until

    port = cluster.free_port()
    cmd = merc_command("serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning")
    second = Proc("api2", cmd, cluster.env, cluster.logs).start()
    try:
        url2 = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url2}/readyz", timeout=2).status_code == 200, 120, "API 2", second)
        job = api.post("/v1/conversations", params={"wait": 30}, json=sample_conversation(2, tag="pa")).json()
        assert job["status"] == "succeeded", job
        path = f"/v1/conversations/{job['id']}/utterances"
        bodies = [{"utterances": [{"speaker": "A", "text": f"appended turn {i}"}]} for i in range(8)]

        def post(i: int) -> httpx.Response:
            base = cluster.api_url if i % 2 == 0 else url2
            return httpx.post(base + path, params={"wait": 30}, json=bodies[i], timeout=90)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        assert {r.status_code for r in answers} <= {200, 202}, [r.text for r in answers]  # 202: still queued
        deadline, full = time.monotonic() + 240, {}
        while time.monotonic() < deadline:
            full = api.get(f"/v1/conversations/{job['id']}").json()
            if full["n_utterances"] >= 10:
                break
            time.sleep(0.5)
        ids = [u["id"] for u in full["result"]["utterances"]]
        texts = sorted(u["text"] for u in full["result"]["utterances"][2:])
        assert (
            full["n_utterances"] == 10
            and len(set(ids)) == 10
            and texts == sorted(b["utterances"][0]["text"] for b in bodies)
        )
    finally:
        second.stop()


def test_api_process_never_maps_libtorch_and_stays_small(cluster: LocalCluster, api) -> None:
    """Issue 12, item 10: the API validates from manifests; appends and media run on the workers."""
    from tests.local_cluster import wait_until

    ids = [submit_text(api, 5), submit_audio(api)]
    wait_all(api, ids, timeout=60)
    turn = {"utterances": [{"speaker": "B", "text": "And one more turn, appended."}]}
    r = api.post(f"/v1/conversations/{ids[0]}/utterances", params={"wait": 60}, json=turn, timeout=90)
    assert r.status_code in (200, 202), r.text
    wait_until(lambda: api.get(f"/v1/conversations/{ids[0]}").json()["n_utterances"] == 6, 240, "the append")
    pid = cluster.api.pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    assert rss_kb < 400 * 1024, f"API RSS {rss_kb / 1024:.0f} MB"
