"""The bring-your-own-media path on RAVDESS: the committed weights/iteach-ravdess8 bundle (made by `merc extract`
+ `merc train`) describes itself, and `merc extract --bundle` + `merc evaluate` score it on real dev speech."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service.media_helpers import ROOT, SHARED_MEDIA
from tests.service.test_cli import merc

RAVDESS8 = ROOT.parent / "shared" / "data" / "ravdess8"
BUNDLE = ROOT / "weights" / "iteach-ravdess8"
needs_ravdess8 = pytest.mark.skipif(not (RAVDESS8 / "dev.jsonl").is_file(), reason="../shared/data/ravdess8 absent")
needs_bundle = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason="iteach-ravdess8 not built")


@needs_bundle
def test_committed_ravdess8_bundle_is_small_and_describes_its_normalisation() -> None:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert manifest["architecture"] == "iteach"
    assert manifest["dataset"]["name"] == "ravdess8+ravdess8-noisy"  # with its degraded copy (augment_speech.py)
    assert manifest["dev_metrics_by_dataset"]["ravdess8"]["uar"] >= 55
    assert manifest["labels"] == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    audio = manifest["feature_spec"]["audio"]
    assert audio["extractor"] == "compare2016" and audio["normalise"]["by"] == "speaker"
    assert manifest["command"].startswith("merc train iteach") and "--speaker-norm audio" in manifest["command"]
    assert manifest["dev_metrics"]["uar"] >= 55
    assert sum(f.stat().st_size for f in BUNDLE.iterdir()) < 15_000_000


@needs_bundle
@needs_ravdess8
@pytest.mark.slow
def test_extract_with_the_bundle_then_evaluate_one_dev_session(tmp_path: Path) -> None:
    """One dev actor's session, eight FLAC files: extraction follows the bundle's spec and evaluation reads audio."""
    data = tmp_path / "one"
    data.mkdir()
    (data / "dataset.json").write_text((RAVDESS8 / "dataset.json").read_text())
    first = (RAVDESS8 / "dev.jsonl").read_text().splitlines()[0]
    (data / "dev.jsonl").write_text(first + "\n")
    out = tmp_path / "feats"
    res = merc("extract", "--bundle", str(BUNDLE), "--data", str(data), "--media", str(SHARED_MEDIA / "ravdess8"),
               "--out", str(out), "--device", "cpu", "--quiet")  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "dev.jsonl").read_text().splitlines()]
    assert all(len(u["features"]["audio"]) == 6373 for u in rows[0]["utterances"])
    res = merc("evaluate", "--bundle", str(BUNDLE), "--data", str(out / "dev.jsonl"), "--out", str(tmp_path / "ev"),
               "--device", "cpu")  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["uar"] <= 100
