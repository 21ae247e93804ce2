"""`merc train` and `merc evaluate` end to end on small files the test writes."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def make_dataset(folder: Path, n_convs: int = 24, seed: int = 0) -> Path:
    """A tiny trimodal dataset with inline features; the label lives in the audio."""
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(2, 6)) * 2
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "name": "toy2",
        "labels": ["neg", "pos"],
        "modalities_inline": ["text", "audio", "visual"],
        "feature_spec": {m: {"extractor": f"toy-{m}", "dim": d} for m, d in (("text", 4), ("audio", 6), ("visual", 3))},
    }
    (folder / "dataset.json").write_text(json.dumps(info))
    for split, count in (("train", n_convs), ("dev", 4)):
        rows = []
        for c in range(count):
            utts = []
            for u in range(int(rng.integers(3, 7))):
                y = int(rng.integers(2))
                feats = {
                    "text": rng.normal(size=4).tolist(),
                    "audio": (proto[y] + 0.3 * rng.normal(size=6)).tolist(),
                    "visual": rng.normal(size=3).tolist(),
                }
                utts.append({"id": f"u{u}", "speaker": "s0", "label": info["labels"][y], "features": feats})
            rows.append(json.dumps({"id": f"{split}{c}", "utterances": utts}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def merc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def tiny_sets(arch: str) -> list[str]:
    tiny = importlib.import_module(f"models.{arch}").TINY
    return [x for k, v in tiny.items() for x in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.mark.parametrize("arch", ["iteach", "sdt"])
def test_train_then_evaluate(arch: str, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "toy")
    bundle = tmp_path / "bundle"
    res = merc(
        "train", arch, "--data", str(data), "--out", str(bundle), "--epochs", "20", "--lr", "3e-3", "--batch-size", "4",
        "--device", "cpu", "--quiet", *tiny_sets(arch),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["architecture"] == arch
    assert manifest["labels"] == ["neg", "pos"]
    assert manifest["feature_spec"]["audio"] == {"extractor": "toy-audio", "version": "inline", "dim": 6}
    assert manifest["dataset"]["sha256"] and manifest["history"]
    assert (bundle / "training_curve.png").stat().st_size > 1000

    out = tmp_path / "eval"
    res = merc(
        "evaluate", "--bundle", str(bundle), "--data", str(data / "dev.jsonl"), "--out", str(out),
        "--missing-rates", "0,0.35,0.7", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] > 80
    assert set(metrics["missing_rates"]) == {"0.00", "0.35", "0.70"}
    assert json.loads((out / "metrics.json").read_text())["weighted_f1"] == metrics["weighted_f1"]
    report = (out / "report.md").read_text()
    assert ".png" in report
    assert len(list(out.glob("*.png"))) >= 2

    # The label lives in the audio: dropping text everywhere keeps it, dropping audio loses it.
    common = ["evaluate", "--bundle", str(bundle), "--data", str(data / "dev.jsonl"), "--device", "cpu", "--quiet"]
    no_text = json.loads(merc(*common, "--out", str(tmp_path / "e1"), "--drop", "text").stdout.splitlines()[-1])
    no_audio = json.loads(merc(*common, "--out", str(tmp_path / "e2"), "--drop", "audio").stdout.splitlines()[-1])
    assert no_text["accuracy"] > 80 > no_audio["accuracy"]
    assert no_text["dropped_modalities"] == ["text"]


def test_evaluate_errors_are_clear(tmp_path: Path) -> None:
    res = merc("evaluate", "--bundle", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--quiet")
    assert res.returncode == 2 and "not a bundle" in res.stderr
    res = merc("train", "nosuch", "--data", str(make_dataset(tmp_path / "d")), "--quiet")
    assert res.returncode == 2 and "unknown architecture" in res.stderr
    res = merc("train", "sdt", "--data", str(tmp_path / "d"), "--set", "lr=1", "--quiet")
    assert res.returncode == 2 and "model.NAME=VALUE" in res.stderr
