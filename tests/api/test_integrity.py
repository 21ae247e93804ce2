"""Issue 12 over real HTTP: no race or odd input corrupts a result, jobs stop at their time limit,
errors leak no server path, crashed uploads are swept, /metrics stays bounded, and the small
protocol defects (404 echo, 307 Location, /readyz, OpenAPI) are fixed."""

from __future__ import annotations

import concurrent.futures
import io
import os
import time

import av
import httpx
import numpy as np
import pytest

from tests.api.conftest import assert_problem, conversation
from tests.api.test_restart import long_conversation, wait_status

TIMEOUT_S = 6.0


class _Pipe(io.RawIOBase):
    """A non-seekable sink: the matroska muxer cannot go back to write the duration."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b) -> int:
        self.data += b
        return len(b)


def streamed_mkv(seconds: float, fps: int = 10) -> bytes:
    """A video-only matroska file that declares no duration (like ``ffmpeg ... -f matroska pipe:1``)."""
    pipe = _Pipe()
    with av.open(pipe, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 7 % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return bytes(pipe.data)


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    data = tmp_path_factory.mktemp("integrity")
    (data / "tmp").mkdir()
    stale, fresh = data / "tmp" / "0badc0de.upload", data / "tmp" / "cafe.upload"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"still streaming")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    srv = server_factory(
        data,
        MERC_PRELOAD="sdt-mosi2",
        MERC_JOB_TIMEOUT_S=str(TIMEOUT_S),
        MERC_MAX_MEDIA_SECONDS="10",
        MERC_MAX_UTTERANCES="2000",
    )
    srv.stale, srv.fresh = stale, fresh
    return srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def mosi(value: float, dims: dict[str, int]) -> dict:
    return {
        "model": "sdt-mosi2",
        "utterances": [{"speaker": "A", "features": {m: [value] * d for m, d in dims.items()}}],
    }


def test_extreme_inline_features_are_refused_and_results_stay_finite(client):
    """Defect 1: 1e20 inputs overflowed to NaN distributions stored as a success (every GET a 500)."""
    spec = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "sdt-mosi2")["feature_spec"]
    dims = {m: e["dim"] for m, e in spec.items()}
    body = assert_problem(client.post("/v1/conversations", json=mosi(1e20, dims)), 422, "utterances[0].features.text")
    assert body["type"].endswith("feature-out-of-range")
    r = client.post("/v1/conversations", json=mosi(1e6, dims))  # the largest value accepted
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    job = client.get(r.headers["location"]).json()
    assert all(np.isfinite(list(u["distribution"].values())).all() for u in job["result"]["utterances"])


def test_appends_racing_a_delete_answer_404_or_409_never_500(client):
    """Defect 2: an append racing DELETE wrote into the removed folder (FileNotFoundError, 500)."""
    turn = {"utterances": [{"speaker": "A", "text": "And another thing!"}]}
    codes: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for round_ in range(3):
            job = client.post("/v1/conversations", json=conversation(2, f"Race {round_}: ")).json()
            url = f"/v1/conversations/{job['id']}"
            appends = [pool.submit(client.post, f"{url}/utterances", json=turn) for _ in range(6)]
            time.sleep(0.05 * round_)
            deleted = pool.submit(client.delete, url)
            codes += [f.result().status_code for f in appends]
            assert deleted.result().status_code == 204
            assert_problem(client.get(url), 404, "job_id")
    assert set(codes) <= {200, 404, 409}, codes


def test_parallel_appends_keep_every_turn_exactly_once(client):
    """Defect 3: ids and the duplicate check were computed before the per-conversation lock."""
    job = client.post("/v1/conversations", json=conversation(2, "Parallel: ")).json()
    url = f"/v1/conversations/{job['id']}/utterances"
    turns = [{"utterances": [{"speaker": "A", "text": f"Turn number {i}."}]} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: client.post(url, json=t), turns))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    full = client.get(f"/v1/conversations/{job['id']}").json()
    ids = [u["id"] for u in full["result"]["utterances"]]
    assert full["n_utterances"] == 10 and len(set(ids)) == 10, ids
    assert sorted(u["text"] for u in full["result"]["utterances"][2:]) == sorted(f"Turn number {i}." for i in range(8))

    dup = {"utterances": [{"id": "dup", "speaker": "B", "text": "Same id."}]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post(url, json=dup), range(8)))
    assert sorted(r.status_code for r in answers) == [200] + [422] * 7, [r.text for r in answers]
    for r in answers:
        if r.status_code == 422:
            assert_problem(r, 422, "utterances[0].id")
    ids = [u["id"] for u in client.get(f"/v1/conversations/{job['id']}").json()["result"]["utterances"]]
    assert ids.count("dup") == 1 and len(ids) == 11


def test_media_without_a_declared_duration_is_measured(client):
    """Defect 4: a matroska written to a pipe declares no duration; the limit was skipped."""
    long_mkv = streamed_mkv(20.0)
    with av.open(io.BytesIO(long_mkv)) as c:
        assert c.duration is None  # the container really declares none
    timed = '{"utterances": [{"speaker": "A", "text": "hi", "start": 0, "end": 1}]}'
    files = {"video": ("x.mkv", long_mkv, "video/x-matroska"), "transcript": (None, timed)}
    body = assert_problem(client.post("/v1/conversations", files=files), 413, "video")
    assert body["type"].endswith("media-too-long")
    late = '{"utterances": [{"speaker": "A", "text": "hi", "start": 0, "end": 9}]}'
    files = {"video": ("x.mkv", streamed_mkv(3.0), "video/x-matroska"), "transcript": (None, late)}
    assert_problem(client.post("/v1/conversations", files=files), 422, "transcript.utterances[0].end")


def test_error_details_hold_no_server_paths(client, server):
    """Defect 5: a truncated mp4's 422 detail held .../data/tmp/<hex>.upload."""
    from tests.api.test_bad_input import silent_video

    truncated = silent_video()[:600]
    timed = '{"utterances": [{"speaker": "A", "text": "hi", "start": 0, "end": 1}]}'
    files = {"video": ("x.mp4", truncated, "video/mp4"), "transcript": (None, timed)}
    body = assert_problem(client.post("/v1/conversations", files=files), 422, "video")
    text = str(body)
    assert ".upload" not in text and str(server.data_dir) not in text and "/tmp" not in text, text


def test_uploads_left_by_a_crash_are_swept_at_startup(server):
    """Defect 6: an upload cut off by a crash stayed in tmp/ forever."""
    assert not server.stale.exists()
    assert server.fresh.exists()  # a recent file may belong to an upload in progress


def test_unknown_methods_do_not_grow_metrics(client):
    """Defect 8: every unknown method name added ~21 series."""
    client.request("BREW", "/healthz")
    client.get("/no/such/path")
    client.get("/metrics")
    before = client.get("/metrics").text.count("\n")  # every series these requests make exists now
    for i in range(40):
        client.request(f"BREW{i}", "/healthz")
        client.get(f"/no/such/path/{i}")
    text = client.get("/metrics").text
    assert 'method="other"' in text and "BREW" not in text and "/no/such/path" not in text
    assert text.count("\n") == before


def test_small_protocol_defects(client, server):
    """Defect 9: 404 echo, Host-based 307, OPTIONS Allow, OpenAPI of /metrics, 401 and the append body."""
    r = client.get("/v1/" + "x" * 12_000)
    assert r.status_code == 404 and len(r.content) < 2000
    r = client.get("/v1/conversations/", headers={"Host": "evil.example"}, follow_redirects=False)
    if r.status_code in (307, 308):
        assert r.headers["location"].startswith("/") and "evil" not in r.headers["location"]
    job = client.post("/v1/conversations", json=conversation(1)).json()
    allow = client.options(f"/v1/conversations/{job['id']}").headers["allow"]
    assert {"GET", "DELETE"} <= set(allow.replace(" ", "").split(","))
    spec = client.get("/openapi.json").json()
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]
    assert spec["paths"]["/v1/conversations/{job_id}/utterances"]["post"]["requestBody"]["required"] is True


def test_readyz_is_not_ready_without_any_worker(server):
    """Defect 9: /readyz was 200 with MERC_WORKERS=0 (no worker would ever run a job)."""
    from tests.api.conftest import Server

    srv = Server(server.data_dir.parent / "no-worker", server.data_dir.parent / "cache", MERC_WORKERS="0")
    srv.data_dir.mkdir(exist_ok=True)
    with pytest.raises(RuntimeError, match="not ready"):
        srv.start(timeout=20)
    try:
        body = assert_problem(httpx.get(f"{srv.url}/readyz", timeout=5), 503)
        assert body["checks"]["worker_alive"] is False
    finally:
        srv.stop()


def test_a_job_past_its_time_limit_is_stopped_and_the_next_one_runs(client):
    """Item 11: MERC_JOB_TIMEOUT_S was checked only after the job had finished."""
    started = time.monotonic()
    slow = client.post("/v1/conversations", params={"wait": 0}, json=long_conversation(1500, 12)).json()
    after = client.post("/v1/conversations", params={"wait": 0}, json=conversation(2, "Next: ")).json()
    failed = wait_status(client, slow["id"], {"succeeded", "failed"}, timeout=120)
    assert failed["status"] == "failed", "the slow job finished within the limit: make it longer"
    assert failed["error"]["type"] == "urn:merc:problem:job-timeout"
    assert "MERC_JOB_TIMEOUT_S" in failed["error"]["detail"]
    assert failed["updated_at"] - failed["created_at"] < TIMEOUT_S + 10
    nxt = wait_status(client, after["id"], {"succeeded", "failed"}, timeout=120)
    assert nxt["status"] == "succeeded", nxt
    assert time.monotonic() - started < 120
