"""service.inference.pipeline (the worker's code path), `merc extract` (resumable, skips bad files), `merc predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.data import parse_conversation, read_jsonl
from service.features.registry import make_spec
from service.inference.pipeline import MediaError, MediaInput, extract_features, extract_features_many
from tests.service.media_helpers import SHARED_MEDIA, tone, write_video
from tests.service.test_cli import ROOT, merc

AUDIO_SPEC = {"audio": make_spec("audio", "egemaps-v02")}


def conversation(cid: str, n: int = 3, seconds: float = 1.0) -> dict:
    utts = [
        {"id": f"{cid}_u{i}", "speaker": f"s{i % 2}", "text": f"sentence {i}", "start": i * seconds,
         "end": (i + 1) * seconds, "label": ["neg", "pos"][i % 2]}
        for i in range(n)
    ]  # fmt: skip
    return {"id": cid, "utterances": utts}


def test_extract_features_audio_present_silence_absent(tmp_path: Path) -> None:
    signal = np.concatenate([tone(1.0), np.zeros(16000, np.float32), tone(1.0, freq=330)])
    video = write_video(tmp_path / "c.mp4", seconds=3.0, audio=signal)
    conv = parse_conversation(conversation("c"), "c")
    feats, timings = extract_features(conv, AUDIO_SPEC, MediaInput(video=video), "cpu")
    assert [v is not None for v in feats["audio"]] == [True, False, True]
    assert feats["audio"][0].shape == (88,)
    assert set(timings) >= {"decode", "text", "audio", "face_detection", "face_cnn"} and timings["decode"] > 0
    none, _ = extract_features(conv, AUDIO_SPEC, None, "cpu")
    assert none["audio"] == [None] * 3
    with pytest.raises(MediaError, match=r"broken\.mp4"):
        (tmp_path / "broken.mp4").write_bytes(b"\0" * 100)
        extract_features(conv, AUDIO_SPEC, MediaInput(video=tmp_path / "broken.mp4"), "cpu")


def make_media_dataset(root: Path) -> tuple[Path, Path]:
    data, media = root / "data", root / "media"
    data.mkdir()
    media.mkdir()
    (data / "dataset.json").write_text(json.dumps({"name": "toymedia", "labels": ["neg", "pos"]}))
    for split, count in (("train", 6), ("dev", 2)):
        convs = [conversation(f"{split}{c}") for c in range(count)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
        for c in range(count):
            rng = np.random.default_rng(c)
            sound = tone(3.0, freq=150 + 40 * rng.random())
            write_video(media / f"{split}{c}.mp4", seconds=3.0, size=(64, 48), audio=sound)
    (media / "train5.mp4").write_bytes(b"")  # a bad file: reported, skipped
    return data, media


@pytest.mark.slow
def test_merc_extract_resumes_skips_bad_files_and_feeds_train(tmp_path: Path) -> None:
    data, media = make_media_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    first = read_jsonl(data / "train.jsonl")[0]
    (out / "train.jsonl.partial").write_text(json.dumps({"id": first.id, "utterances": [{"speaker": "x"}]}) + "\n{tor")
    args = ["extract", "--data", str(data), "--media", str(media), "--out", str(out), "--modalities", "audio"]
    res = merc(*args, "--audio", "egemaps-v02", "--quiet")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["conversations"] == {"dev.jsonl": 2, "train.jsonl": 5} and summary["errors"] == 1
    assert "train5.mp4" in (out / "errors.jsonl").read_text()
    train = read_jsonl(out / "train.jsonl")
    assert train[0].utterances[0].speaker == "x"  # resumed: the finished conversation was not redone
    assert all(len(u.features["audio"]) == 88 for u in train[1].utterances)
    assert all("audio" not in u.features for u in train[5].utterances)
    info = json.loads((out / "dataset.json").read_text())
    assert info["feature_spec"]["audio"]["extractor"] == "egemaps-v02" and info["feature_spec"]["audio"]["dim"] == 88
    bundle = tmp_path / "bundle"
    res = merc("train", "sdt", "--data", str(out), "--out", str(bundle), "--modalities", "audio", "--epochs", "2",
               "--quiet", "--set", "model.hidden=32", "--set", "model.n_heads=4")  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["feature_spec"]["audio"]["version"].startswith("opensmile==")  # real spec, not "inline"
    res = merc("predict", str(media / "dev0.mp4"), "--transcript", str(_transcript(tmp_path)), "--bundle", str(bundle))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["modalities"]["audio"]["used"] and len(result["utterances"]) == 3
    assert result["utterances"][0]["modalities"] == ["audio"]


def _transcript(tmp_path: Path) -> Path:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(conversation("dev0")))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "weights" / "sdt-meld7").is_dir(), reason="bundle weights/sdt-meld7 absent")
def test_merc_predict_text_bundle_on_video_reports_unused_modalities(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=3.0, audio=tone(3.0))
    res = merc("predict", str(video), "--transcript", str(_transcript(tmp_path)), "--bundle", "sdt-meld7")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["model"] == "sdt-meld7" and len(result["utterances"]) == 3
    assert result["modalities"]["text"]["used"] and not result["modalities"]["audio"]["used"]
    assert "does not use audio" in result["modalities"]["audio"]["reason"]
    dist = result["utterances"][0]["distribution"]
    assert abs(sum(dist.values()) - 1) < 1e-4 and set(dist) == set(result["labels"])
    bad = merc("predict", str(tmp_path / "nothing.mp4"), "--bundle", "sdt-meld7")
    assert bad.returncode == 2 and "nothing.mp4: no such file" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="../shared/media absent")
def test_batch_of_conversations_equals_one_by_one() -> None:
    spec = {**AUDIO_SPEC, "visual": make_spec("visual")}
    convs = [parse_conversation(conversation(cid, n=2, seconds=1.2), cid) for cid in ("face", "noface")]
    medias = [MediaInput(video=SHARED_MEDIA / "single_face.mp4"), MediaInput(video=SHARED_MEDIA / "no_face.mp4")]
    batch, timings = extract_features_many(convs, spec, medias, "cpu")
    assert timings["face_detection"] > 0
    assert all(v is not None for v in batch[0]["visual"]) and batch[1]["visual"] == [None, None]
    for conv, media, got in zip(convs, medias, batch, strict=True):
        alone, _ = extract_features(conv, spec, media, "cpu")
        for m in spec:
            for a, b in zip(alone[m], got[m], strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
