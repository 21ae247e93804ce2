"""The chatbot calls, media jobs, model selection, deletion and observability, over real HTTP."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service.settings import Settings
from tests.api.conftest import MEDIA, ROOT, assert_problem, conversation

DEFAULT = Settings().default_model
OTHER = "dmd-meld7" if DEFAULT != "dmd-meld7" else "sdt-meld7"  # preloaded, not the default


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(MERC_PRELOAD=OTHER, MERC_CALLBACK_ALLOW_PRIVATE="true")  # callbacks to 127.0.0.1


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def check_distributions(result: dict, labels: list[str]) -> None:
    for u in result["utterances"]:
        assert list(u["distribution"]) == labels
        assert math.isclose(sum(u["distribution"].values()), 1.0, abs_tol=1e-4)
        assert u["emotion"] == max(u["distribution"], key=u["distribution"].get)


def test_chatbot_calls_post_append_get(client):
    r = client.post("/v1/conversations", json=conversation(3))
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded" and r.headers["location"] == f"/v1/conversations/{job['id']}"
    result = job["result"]
    assert result["model"] == DEFAULT and len(result["labels"]) == 7
    assert [u["id"] for u in result["utterances"]] == ["u0", "u1", "u2"]
    assert [u["index"] for u in result["utterances"]] == [0, 1, 2]
    assert all(u["modalities"] == ["text"] for u in result["utterances"])
    check_distributions(result, result["labels"])
    assert result["modalities"]["text"] == {"supplied": True, "used": True, "reason": None}

    turn = {"utterances": [{"speaker": "A", "text": "Get out of my house right now!"}]}
    r = client.post(f"/v1/conversations/{job['id']}/utterances", json=turn)
    assert r.status_code == 200, r.text
    appended = r.json()
    assert [(u["index"], u["id"]) for u in appended["utterances"]] == [(3, "utt3")]
    check_distributions(appended, result["labels"])
    assert appended["timings"]["predict"] > 0 and all(v >= 0 for v in appended["timings"].values())

    r = client.get(f"/v1/conversations/{job['id']}")
    full = r.json()
    assert r.status_code == 200 and full["n_utterances"] == 4
    assert [u["id"] for u in full["result"]["utterances"]] == ["u0", "u1", "u2", "utt3"]
    assert full["result"]["utterances"][3]["distribution"] == appended["utterances"][0]["distribution"]
    # the earlier utterances are rescored in the context of the new one, from their stored features
    assert full["result"]["utterances"][0]["text"] == result["utterances"][0]["text"]


def test_append_matches_scoring_the_whole_conversation(client):
    """Stored features + new turn give the same distributions as posting all turns at once."""
    whole = conversation(4, prefix="Honestly, ")
    first = {"utterances": whole["utterances"][:3]}
    job = client.post("/v1/conversations", json=first).json()
    appended = client.post(f"/v1/conversations/{job['id']}/utterances", json={"utterances": whole["utterances"][3:]})
    direct = client.post("/v1/conversations", json=whole).json()["result"]["utterances"][3]
    got = appended.json()["utterances"][0]
    assert got["id"] == "u3"
    for label, p in direct["distribution"].items():
        assert math.isclose(got["distribution"][label], p, abs_tol=1e-5)


def test_async_job_with_wait_zero_then_poll(client):
    r = client.post("/v1/conversations", params={"wait": 0}, json=conversation(2, prefix="Later: "))
    assert r.status_code in (200, 202)
    for _ in range(200):
        job = client.get(r.headers["location"]).json()
        if job["status"] in ("succeeded", "failed"):
            break
        threading.Event().wait(0.05)
    assert job["status"] == "succeeded" and len(job["result"]["utterances"]) == 2


def test_model_selection_and_listing(client):
    models = client.get("/v1/models").json()
    names = {m["name"]: m for m in models["models"]}
    assert models["default"] == DEFAULT and names[DEFAULT]["default"]
    assert names[OTHER]["loaded"] and not names[OTHER]["default"] and names["sdt-mosi2"]["architecture"] == "sdt"
    assert names["iteach-mosi2"]["modalities"] == ["text", "audio", "visual"]
    assert set(names["dmd-iemocap6"]["dev_metrics"]) == {"accuracy", "weighted_f1", "macro_f1"}
    assert names["iteach-ravdess8"]["non_commercial"] and "CC BY-NC-SA 4.0" in names["iteach-ravdess8"]["licence"]
    assert names["sdt-meld7-av"]["non_commercial"]  # trained on meld7 + ravdess8 + emodb7: RAVDESS's terms
    assert not names[DEFAULT]["non_commercial"] and names[DEFAULT]["licence"] is None
    body = {**conversation(2), "model": "dmd-iemocap6"}
    result = client.post("/v1/conversations", json=body).json()["result"]
    assert result["model"] == "dmd-iemocap6" and result["labels"] == names["dmd-iemocap6"]["labels"]
    check_distributions(result, result["labels"])


def test_inline_features_for_a_trimodal_bundle(client):
    """A mosi2 bundle takes precomputed vectors; the response says which modalities it used."""
    spec = client.get("/v1/models").json()
    dims = {m: e["dim"] for m, e in next(x for x in spec["models"] if x["name"] == "sdt-mosi2")["feature_spec"].items()}
    utts = [
        {"speaker": "A", "text": None, "features": {"text": [0.1] * dims["text"], "audio": [0.2] * dims["audio"]}},
        {"speaker": "B", "text": None, "features": {"audio": [0.0] * dims["audio"]}},
    ]
    result = client.post("/v1/conversations", json={"model": "sdt-mosi2", "utterances": utts}).json()["result"]
    assert [u["modalities"] for u in result["utterances"]] == [["text", "audio"], ["audio"]]
    assert result["modalities"]["visual"] == {"supplied": False, "used": False, "reason": "not supplied"}
    check_distributions(result, result["labels"])


def test_delete_removes_everything(client, server):
    job = client.post("/v1/conversations", json=conversation(2)).json()
    folder = next(p for p in (server.data_dir / "jobs").iterdir() if p.name == job["id"].replace("-", ""))
    assert (folder / "features.npz").is_file() and (folder / "request.json").is_file()
    assert client.delete(f"/v1/conversations/{job['id']}").status_code == 204
    assert not folder.exists()
    assert_problem(client.get(f"/v1/conversations/{job['id']}"), 404, "job_id")
    assert_problem(client.delete(f"/v1/conversations/{job['id']}"), 404, "job_id")
    assert_problem(client.post(f"/v1/conversations/{job['id']}/utterances", json=conversation(1)), 404, "job_id")


@pytest.mark.shared
def test_media_job_on_a_face_video(client, server):
    video = MEDIA / "single_face.mp4"
    if not video.is_file():
        pytest.skip("../shared/media/single_face.mp4 absent")
    transcript = {
        "id": "face-clip",
        "utterances": [
            {"speaker": "A", "text": "Hello there, how are you?", "start": 0.0, "end": 1.2},
            {"speaker": "A", "text": "I'm really happy to see you.", "start": 1.2, "end": 2.4},
        ],
    }
    files = {"video": ("clip.bin", video.read_bytes(), "text/plain"), "transcript": (None, json.dumps(transcript))}
    r = client.post("/v1/conversations", params={"wait": 30}, files=files, data={"model": "sdt-meld7"})
    assert r.status_code in (200, 202), r.text
    job = client.get(r.headers["location"]).json()
    for _ in range(600):
        if job["status"] in ("succeeded", "failed"):
            break
        threading.Event().wait(0.1)
        job = client.get(r.headers["location"]).json()
    assert job["status"] == "succeeded", job
    assert job["media"]["video"]["format"] == "mp4" and job["media"]["video"]["has_video"]
    assert 2.0 < job["media"]["video"]["duration"] < 3.0
    result = job["result"]
    assert result["model"] == "sdt-meld7" and [u["start"] for u in result["utterances"]] == [0.0, 1.2]
    # a text bundle cannot use the video's pictures or sound, and says so
    for m in ("audio", "visual"):
        assert result["modalities"][m]["supplied"] and not result["modalities"][m]["used"]
        assert "does not use" in result["modalities"][m]["reason"]
    folder = server.data_dir / "jobs" / job["id"].replace("-", "")
    assert sorted(p.name for p in folder.iterdir()) == ["features.npz", "request.json", "video.mp4"]
    assert not list((server.data_dir / "tmp").iterdir())


@pytest.mark.shared
def test_media_job_without_a_model_uses_the_media_bundle(client):
    """An upload naming no model goes to MERC_DEFAULT_MEDIA_MODEL, which reads the sound as well as the words."""
    video, media_model = MEDIA / "single_face.mp4", Settings().default_media_model
    if not video.is_file() or not (ROOT / "weights" / media_model / "manifest.json").is_file():
        pytest.skip(f"../shared/media/single_face.mp4 or weights/{media_model} absent")
    transcript = {"utterances": [{"speaker": "A", "text": "I'm really happy to see you.", "start": 0.0, "end": 2.4}]}
    files = {"video": ("clip.mp4", video.read_bytes(), "video/mp4"), "transcript": (None, json.dumps(transcript))}
    r = client.post("/v1/conversations", params={"wait": 60}, files=files)
    assert r.status_code in (200, 202), r.text
    job = client.get(r.headers["location"]).json()
    for _ in range(600):
        if job["status"] in ("succeeded", "failed"):
            break
        threading.Event().wait(0.1)
        job = client.get(r.headers["location"]).json()
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert job["model"] == result["model"] == media_model
    assert result["modalities"]["audio"]["used"] and result["modalities"]["text"]["used"]


def test_callback_url_receives_the_finished_job(client):
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_port}/done"
        job = client.post("/v1/conversations", json={**conversation(2), "callback_url": url}).json()
        for _ in range(100):
            if received:
                break
            threading.Event().wait(0.05)
    finally:
        hook.shutdown()
    assert received and received[0]["id"] == job["id"] and received[0]["status"] == "succeeded"
    assert len(received[0]["result"]["utterances"]) == 2


def test_health_readiness_metrics_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and DEFAULT in ready["models"]
    text = client.get("/metrics").text
    for name in (
        "merc_http_requests_total",
        "merc_http_request_seconds_bucket",
        "merc_queue_jobs",
        "merc_stage_seconds_count",
        "merc_jobs_total",
    ):
        assert name in text
    assert 'route="/v1/conversations",status="200"' in text
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/conversations"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "UtteranceIn" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
