"""At least twenty kinds of bad input, each answered 4xx problem+json naming the field,
while the server keeps serving and nothing already stored is lost."""

from __future__ import annotations

import io
import json
import wave

import av
import httpx
import numpy as np
import pytest

from tests.api.conftest import assert_problem, conversation
from tests.api.test_restart import wait_status
from tests.service.media_helpers import huge_frame_video, tone, understate_duration, write_m4a

KEY = "test-key-123"
GOOD = conversation(2)


@pytest.fixture(scope="module")
def server(server_factory):
    limits = {"MERC_MAX_UPLOAD_MB": "0.5", "MERC_MAX_UTTERANCES": "40", "MERC_MAX_MEDIA_SECONDS": "10"}
    return server_factory(MERC_API_KEYS=f"{KEY},other-key", **limits)


@pytest.fixture(scope="module")
def client(server):
    with server.client(**{"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def stored(client):
    """A conversation stored before the bad requests; it must survive them."""
    r = client.post("/v1/conversations", json=GOOD)
    assert r.status_code == 200
    return r.json()


def wav_bytes(seconds: float = 1.0, channels: int = 1, rate: int = 16000) -> bytes:
    """PCM WAV of a tone, the same in every channel (plain WAVE_FORMAT_PCM: no channel order)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        tone = (np.sin(np.arange(int(rate * seconds)) / 10) * 8000).astype(np.int16)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return buf.getvalue()


def silent_video(seconds: float = 2.0) -> bytes:
    """An mp4 with a video stream and no audio stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(10 * seconds)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10 % 255, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def timed(end: float = 1.0, **extra) -> str:
    return json.dumps({"utterances": [{"speaker": "A", "text": "Hello", "start": 0.0, "end": end, **extra}]})


def utts(*items: dict) -> dict:
    return {"utterances": list(items)}


U = {"speaker": "A", "text": "hi"}

JSON_CASES = [
    # (name, body, expected status, field)
    ("not an object", [1, 2], 422, "body"),
    ("no utterances", {"id": "x"}, 422, "utterances"),
    ("empty utterances", {"utterances": []}, 422, "utterances"),
    ("missing speaker", utts({"text": "hi"}), 422, "utterances[0].speaker"),
    ("blank speaker", utts(U, {"speaker": "  ", "text": "yo"}), 422, "utterances[1].speaker"),
    ("text not a string", utts({"speaker": "A", "text": 5}), 422, "utterances[0].text"),
    ("start not a number", utts({**U, "start": "soon"}), 422, "utterances[0].start"),
    ("negative start", utts({**U, "start": -1.0, "end": 2.0}), 422, "utterances[0].start"),
    ("end before start", utts(U, {**U, "start": 3.0, "end": 2.0}), 422, "utterances[1].end"),
    ("duplicate ids", utts({**U, "id": "a"}, {**U, "id": "a"}), 422, "utterances[1].id"),
    ("unknown model", {**GOOD, "model": "gpt-emotion"}, 422, "model"),
    ("model as a path", {**GOOD, "model": "../weights/dmd-meld7"}, 422, "model"),
    ("too many utterances", utts(*[U] * 41), 422, "utterances"),
    ("text too long", utts({**U, "text": "a" * 6000}), 422, "utterances[0].text"),
    ("nothing to score", utts({"speaker": "A"}, {"speaker": "B", "text": " "}), 422, "utterances"),
    ("unknown modality", utts({**U, "features": {"smell": [1.0]}}), 422, "utterances[0].features.smell"),
    ("bad callback url", {**GOOD, "callback_url": "not a url"}, 422, "callback_url"),
    ("callback to loopback", {**GOOD, "callback_url": "http://127.0.0.1:6379/"}, 422, "callback_url"),
    ("callback to cloud metadata", {**GOOD, "callback_url": "http://169.254.169.254/latest"}, 422, "callback_url"),
    (
        "inline features of the wrong size",
        {"model": "sdt-mosi2", **utts({"speaker": "A", "features": {"audio": [0.5] * 3}})},
        422,
        "utterances[0].features.audio",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "field"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_bodies(client, stored, name, body, status, field):
    assert_problem(client.post("/v1/conversations", json=body), status, field)


def test_malformed_json_and_wrong_content_type(client, stored):
    headers = {"content-type": "application/json"}
    body = assert_problem(client.post("/v1/conversations", content=b'{"utterances": [', headers=headers), 400, "body")
    assert "JSON" in body["detail"]
    assert_problem(client.post("/v1/conversations", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert_problem(client.post("/v1/conversations", json=GOOD, params={"wait": 9999}), 422, "wait")
    assert_problem(client.post("/v1/conversations", json=GOOD, params={"wait": "soon"}), 422, "wait")


def test_api_keys(server, stored):
    with server.client() as anonymous:
        assert_problem(anonymous.post("/v1/conversations", json=GOOD), 401, "X-API-Key")
        assert_problem(anonymous.get("/v1/models"), 401, "X-API-Key")
        assert anonymous.get("/healthz").status_code == 200
    with server.client(**{"X-API-Key": "wrong"}) as wrong:
        body = assert_problem(wrong.get(f"/v1/conversations/{stored['id']}"), 401, "X-API-Key")
        assert "valid key" in body["detail"]
    with server.client(**{"X-API-Key": "other-key"}) as other:
        assert other.get(f"/v1/conversations/{stored['id']}").status_code == 200


def post_media(client, files: dict, data: dict | None = None) -> httpx.Response:
    return client.post("/v1/conversations", files=files, data=data or {})


MEDIA_CASES = [
    ("zero-byte video", {"video": ("a.mp4", b"", "video/mp4"), "transcript": (None, timed())}, 422, "video"),
    ("png as video", {"video": ("a.mp4", b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "video/mp4")}, 415, "video"),
    ("text as audio", {"audio": ("a.wav", b"just some words\n" * 20, "audio/wav")}, 415, "audio"),
    ("wav as video", {"video": ("a.mp4", wav_bytes(), "video/mp4")}, 415, "video"),
    (
        "corrupt mp4",
        {"video": ("a.mp4", b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 40, "video/mp4")},
        422,
        "video",
    ),
    ("video without sound as audio", {"audio": ("a.mp4", silent_video(), "audio/mp4")}, 422, "audio"),
    ("no transcript, no sound to transcribe", {"video": ("a.mp4", silent_video(), "video/mp4")}, 422, "transcript"),
    ("no transcript and no media", {"model": (None, "sdt-meld7")}, 422, "transcript"),
    ("transcript not JSON", {"audio": ("a.wav", wav_bytes(), "a/b"), "transcript": (None, "{")}, 422, "transcript"),
    (
        "transcript past the media's end",
        {"audio": ("a.wav", wav_bytes(1.0), "audio/wav"), "transcript": (None, timed(end=5.0))},
        422,
        "transcript.utterances[0].end",
    ),
    (
        "transcript without times",
        {"audio": ("a.wav", wav_bytes(), "audio/wav"), "transcript": (None, json.dumps(utts(U)))},
        422,
        "transcript.utterances[0].start",
    ),
    (
        "transcript end before start",
        {"audio": ("a.wav", wav_bytes(), "audio/wav"), "transcript": (None, timed(end=0.5, start=0.8))},
        422,
        "transcript.utterances[0].end",
    ),
    ("unknown form field", {"picture": ("a.png", b"x", "image/png"), "transcript": (None, timed())}, 422, "picture"),
]
MEDIA_CASES = [
    c
    if "transcript" in c[1] or c[0].startswith("no transcript")
    else (c[0], {**c[1], "transcript": (None, timed())}, *c[2:])
    for c in MEDIA_CASES
]


@pytest.mark.parametrize(("name", "files", "status", "field"), MEDIA_CASES, ids=[c[0] for c in MEDIA_CASES])
def test_bad_media_uploads(client, server, stored, name, files, status, field):
    body = assert_problem(post_media(client, files), status, field)
    assert field.split(".")[0] in body["detail"] or body["field"] == field
    assert not list((server.data_dir / "tmp").iterdir()), "temp files left behind"


def test_frames_over_the_pixel_limit_are_refused_from_the_header(client, server, tmp_path):
    """Issue 21 F1: a few kB declaring 16000x16000 frames get a 422 naming the field and the limit,
    from the stream header (decoding it took 10-20 s and 1.5 GB of the API process per upload)."""
    huge = huge_frame_video(tmp_path / "huge.mov").read_bytes()
    files = {"video": ("a.mov", huge, "video/quicktime"), "transcript": (None, timed(end=0.5))}
    body = assert_problem(post_media(client, files), 422, "video")
    assert body["type"].endswith(":frame-too-large"), body
    assert "16000x16000" in body["detail"] and "MERC_MAX_VIDEO_PIXELS" in body["detail"]
    assert not list((server.data_dir / "tmp").iterdir())


def test_media_longer_than_its_header_says_fails_naming_the_limit(client, tmp_path):
    """Issue 21 F2: an m4a whose mvhd/mdhd/tkhd say 5 s while it holds 30 s passes the submit check
    (MERC_MAX_MEDIA_SECONDS=10 here); the worker stops decoding past the limit and names it."""
    lying = understate_duration(write_m4a(tmp_path / "lying.m4a", tone(30.0)), 5.0)
    r = post_media(client, {"audio": ("a.m4a", lying.read_bytes(), "audio/mp4")})  # no transcript: speech recognition
    assert r.status_code == 202 and r.json()["media"]["audio"]["duration"] == pytest.approx(5.0), r.text
    job = wait_status(client, r.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "failed" and job["error"]["status"] == 422, job
    assert "MERC_MAX_MEDIA_SECONDS" in job["error"]["detail"] and "10 s" in job["error"]["detail"], job["error"]


def test_a_64_channel_wav_is_mixed_down(client):
    """Issue 21 F7: a valid 64-channel WAV failed its job as "corrupt or truncated media near 0.00 s"."""
    files = {"audio": ("a.wav", wav_bytes(0.45, channels=64, rate=8000), "audio/wav"), "transcript": (None, timed(0.4))}
    r = post_media(client, files)
    assert r.status_code == 202, r.text
    job = wait_status(client, r.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["modalities"]["audio"]["supplied"], job["result"]["modalities"]


def test_unknown_model_in_multipart(client, server):
    files = {"audio": ("a.wav", wav_bytes(), "audio/wav"), "transcript": (None, timed())}
    assert_problem(post_media(client, files, {"model": "nope"}), 422, "model")
    assert not list((server.data_dir / "tmp").iterdir())


def test_oversized_upload_is_cut_off_while_streaming(client, server):
    big = wav_bytes(20.0)  # 640 kB > 0.5 MiB
    files = {"audio": ("a.wav", big, "audio/wav"), "transcript": (None, timed())}
    body = assert_problem(post_media(client, files), 413, "audio")
    assert "MiB" in body["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="audio"; filename="x.wav"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]
        yield b"\r\n--b--\r\n"

    try:
        r = client.post(
            "/v1/conversations", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert_problem(r, 413, "audio")
    except httpx.WriteError:
        pass  # the server may close the connection before the client finishes sending
    assert not list((server.data_dir / "tmp").iterdir())


def test_bad_ids_and_appends(client, stored):
    assert_problem(client.get("/v1/conversations/not-a-uuid"), 422, "job_id")
    assert_problem(client.get("/v1/conversations/00000000-0000-4000-8000-000000000000"), 404, "job_id")
    url = f"/v1/conversations/{stored['id']}/utterances"
    assert_problem(client.post(url, json={"utterances": []}), 422, "utterances")
    assert_problem(client.post(url, json=utts({**U, "id": "u0"})), 422, "utterances[0].id")
    assert_problem(client.post(url, json=utts(*[U] * 39)), 422, "utterances")
    assert_problem(client.post(url, content=b"[", headers={"content-type": "application/json"}), 400, "body")
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert_problem(client.put(f"/v1/conversations/{stored['id']}"), 405)


def test_server_still_serves_and_kept_what_it_stored(client, server, stored):
    again = client.get(f"/v1/conversations/{stored['id']}").json()
    assert again["status"] == "succeeded" and again["result"] == stored["result"]
    assert client.post("/v1/conversations", json=GOOD).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert server.proc.poll() is None
    metrics = client.get("/metrics").text
    assert 'merc_rejected_total{problem="corrupt-media"}' in metrics
    assert 'status="500"' not in metrics
