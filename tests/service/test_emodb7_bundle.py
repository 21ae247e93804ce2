"""The bring-your-own-media path: speaker-normalised training, `merc extract --bundle`, `merc evaluate`
(UAR), and the committed emodb7 bundle served on real Emo-DB speech."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.data import Conversation, Utterance, inline_features, read_jsonl
from tests.service.media_helpers import ROOT, SHARED_MEDIA, write_wav
from tests.service.test_cli import merc, tiny_sets

EMODB7 = ROOT.parent / "shared" / "data" / "emodb7"
BUNDLE = ROOT / "weights" / "iteach-emodb7"
needs_emodb7 = pytest.mark.skipif(not (EMODB7 / "dev.jsonl").is_file(), reason="../shared/data/emodb7 absent")


def speaker_dataset(folder: Path, seed: int = 0) -> Path:
    """Labels live in the audio *relative to the speaker's own level*: each speaker (one per
    conversation) shifts every feature by a large random offset, which only per-speaker
    normalisation removes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"text": {"extractor": "toy-text", "dim": 3}, "audio": {"extractor": "toy-audio", "dim": 5}}
    info = {"name": "toyspk", "labels": ["low", "high"], "modalities_inline": ["text", "audio"], "feature_spec": spec}
    (folder / "dataset.json").write_text(json.dumps(info))
    for split, count in (("train", 16), ("dev", 6)):
        rows = []
        for c in range(count):
            offset = rng.normal(size=5) * 6
            utts = []
            for u in range(6):
                y = u % 2
                audio = offset + (2 * y - 1) * 1.0 + 0.3 * rng.normal(size=5)
                feats = {"text": rng.normal(size=3).tolist(), "audio": audio.tolist()}
                utts.append({"id": f"u{u}", "speaker": f"{split}{c}", "label": info["labels"][y], "features": feats})
            rows.append(json.dumps({"id": f"{split}{c}", "utterances": utts}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_speaker_norm_is_trained_stored_evaluated_and_served_alike(tmp_path: Path) -> None:
    from service.inference.pipeline import score
    from service.inference.predictor import Predictor

    data, bundle = speaker_dataset(tmp_path / "toy"), tmp_path / "bundle"
    res = merc(
        "train", "iteach", "--data", str(data), "--out", str(bundle), "--epochs", "12", "--lr", "3e-3",
        "--batch-size", "4", "--device", "cpu", "--quiet", "--speaker-norm", "audio", "--norm-shrink", "2",
        *tiny_sets("iteach"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    entry = json.loads((bundle / "manifest.json").read_text())["feature_spec"]["audio"]
    assert entry["normalise"] == {"by": "speaker", "shrink": 2.0, "file": "audio_speaker_norm.safetensors"}
    assert (bundle / entry["normalise"]["file"]).is_file()
    res = merc("evaluate", "--bundle", str(bundle), "--data", str(data / "dev.jsonl"), "--out", str(tmp_path / "e"),
               "--device", "cpu", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["uar"] > 85 and set(metrics["per_class_recall"]) == {"low", "high"}
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["uar"] == metrics["uar"]
    # serving (pipeline.score) normalises the same way: its predictions score what evaluate scored
    predictor, hits, total = Predictor(bundle, "cpu"), 0, 0
    for conv in read_jsonl(data / "dev.jsonl"):
        feats = {m: inline_features(conv, m) for m in ("text", "audio")}
        out = score(predictor, conv, feats, ["text", "audio"], {})
        hits += sum(u["emotion"] == v.label for u, v in zip(out["utterances"], conv.utterances, strict=True))
        total += len(conv.utterances)
    assert round(100 * hits / total, 2) == metrics["accuracy"]


def test_committed_emodb7_bundle_is_small_and_describes_its_normalisation() -> None:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert manifest["architecture"] == "iteach" and set(manifest["modalities"]) == {"text", "audio"}
    audio = manifest["feature_spec"]["audio"]
    assert audio["extractor"] == "compare2016" and audio["normalise"]["by"] == "speaker"
    assert manifest["weights_dtype"] == "float16" and manifest["dev_metrics"]["uar"] > 70
    assert sum(f.stat().st_size for f in BUNDLE.iterdir()) < 15_000_000


@needs_emodb7
@pytest.mark.slow
def test_emodb7_bundle_uses_audio_for_every_utterance_of_real_speech(tmp_path: Path) -> None:
    """Three dev-speaker utterances in one wav, with a transcript: the fused model reads their audio."""
    from service.inference.pipeline import MediaInput, run_conversation
    from service.inference.predictor import Predictor
    from service.media.decode import decode_media

    conv = next(c for c in read_jsonl(EMODB7 / "dev.jsonl") if c.utterances[0].speaker == "speaker13")
    utts, signals, t = [], [], 0.0
    for u in conv.utterances[:3]:
        signals.append(decode_media(SHARED_MEDIA / "emodb7" / f"{u.id}.wav", [(0.0, None)]).audio)
        utts.append(Utterance(u.id, u.speaker, u.text, t, t + len(signals[-1]) / 16000))
        t = utts[-1].end
    wav = write_wav(tmp_path / "session.wav", np.concatenate(signals))
    result = run_conversation(Predictor(BUNDLE, "cpu"), Conversation("s13", utts), MediaInput(audio=wav), "cpu")
    assert all("audio" in u["modalities"] for u in result["utterances"])
    assert result["modalities"]["audio"] == {"supplied": True, "used": True, "reason": None}
    assert all(set(u["readings"]) == {"voice"} for u in result["utterances"])


@needs_emodb7
@pytest.mark.slow
def test_extract_with_bundle_then_evaluate_reports_uar(tmp_path: Path) -> None:
    """`merc extract --bundle` computes exactly the bundle's audio spec from the wavs; evaluate reads it."""
    data = tmp_path / "emodb7-two"
    data.mkdir()
    (data / "dataset.json").write_text((EMODB7 / "dataset.json").read_text())
    (data / "dev.jsonl").write_text("".join((EMODB7 / "dev.jsonl").read_text().splitlines(keepends=True)[:1]))
    out = tmp_path / "extracted"
    res = merc("extract", "--data", str(data), "--media", str(SHARED_MEDIA / "emodb7"), "--out", str(out),
               "--bundle", str(BUNDLE), "--device", "cpu", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    spec = json.loads((out / "dataset.json").read_text())["feature_spec"]
    bundle_audio = json.loads((BUNDLE / "manifest.json").read_text())["feature_spec"]["audio"]
    assert spec["audio"] == {k: v for k, v in bundle_audio.items() if k != "normalise"} and "visual" not in spec
    res = merc("evaluate", "--bundle", str(BUNDLE), "--data", str(out / "dev.jsonl"), "--out", str(tmp_path / "e"),
               "--device", "cpu", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["n"] >= 6 and metrics["uar"] > 0 and metrics["accuracy"] > 40
    res = merc("extract", "--data", str(data), "--media", str(SHARED_MEDIA / "emodb7"), "--out", str(tmp_path / "x"),
               "--bundle", str(ROOT / "weights" / "dmd-meld7"), "--quiet")  # fmt: skip
    assert res.returncode == 2 and "no audio or visual features" in res.stderr
