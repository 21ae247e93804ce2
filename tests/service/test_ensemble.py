"""Ensemble bundles end to end on CPU: build (`merc ensemble`), load, evaluate, serve, append.

Three tiny SDT members on a small text dataset: two seeds over the frozen MiniLM (one shared text
feature) and one over the frozen MPNet (a second text feature, ``text~1``), so the ensemble reads two
text extractors, each member its own. Its distributions must be the mean of its members'.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.bundle import BundleError, load_bundle
from models.data import read_jsonl
from models.ensemble import combine_specs
from tests.service.test_finetuned_text import LINES, _write_dataset

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = (("a", "minilm-l6-v2", 0), ("b", "minilm-l6-v2", 1), ("c", "mpnet-base-v2", 0))


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(dataset folder, three member bundles); skipped where the packaged encoders are not installed."""
    from service.features.text import _resolve_source
    from service.offline.training import train_bundle

    for name in ("minilm-l6-v2", "mpnet-base-v2"):
        try:
            _resolve_source(name, None).locate()
        except Exception as exc:  # any reason the packaged encoder is unavailable
            pytest.skip(f"packaged {name} unavailable: {exc}")
    root = tmp_path_factory.mktemp("ens")
    data = _write_dataset(root / "tiny3")
    out = []
    for name, encoder, seed in MEMBERS:
        bundle = root / "members" / f"sdt-{name}"
        overrides = {"epochs": 4, "device": "cpu", "seed": seed}
        model = {"hidden": 32, "n_heads": 4, "dropout": 0.1}
        train_bundle(
            "sdt", data, bundle, text_encoder=encoder, model_overrides=model, train_overrides=overrides, progress=False
        )
        out.append(bundle)
    return data, out


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``merc ensemble`` over the three members into weights/ens-tiny3 (copies)."""
    data, bundles = members
    out = tmp_path_factory.mktemp("weights") / "ens-tiny3"
    args = [arg for b in bundles for arg in ("--members", str(b))]
    cmd = [sys.executable, "-m", "service.cli", "ensemble", *args, "--out", str(out), "--data", str(data)]
    res = subprocess.run([*cmd, "--device", "cpu", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(printed["members_dev_weighted_f1"]) == {"sdt-a", "sdt-b", "sdt-c"}
    return out


def _distributions(result: dict) -> np.ndarray:
    return np.array([list(u["distribution"].values()) for u in result["utterances"]])


def test_ensemble_manifest_reads_each_members_text_features(ensemble: Path) -> None:
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert manifest["architecture"] == "ensemble" and manifest["modalities"] == ["text"]
    assert set(manifest["feature_spec"]) == {"text", "text~1"}
    assert [m["features"] for m in manifest["members"]] == [{"text": "text"}, {"text": "text"}, {"text": "text~1"}]
    assert manifest["feature_spec"]["text~1"]["extractor"].startswith("mpnet")
    assert {"weighted_f1", "accuracy"} <= set(manifest["dev_metrics"])
    assert all("weighted_f1" in m["dev_metrics"] for m in manifest["members"])
    assert json.loads((ensemble / "dev_metrics.json").read_text()) == manifest["dev_metrics"]
    assert (ensemble / "members" / "sdt-c" / "model.safetensors").is_file()
    with pytest.raises(BundleError, match="ensemble bundle"):
        load_bundle(ensemble)


def test_ensemble_predicts_the_mean_of_its_members(members, ensemble: Path, tmp_path: Path) -> None:
    from service.inference.ensemble import EnsemblePredictor
    from service.inference.pipeline import run_conversation
    from service.inference.predictor import Predictor

    data, bundles = members
    conv = read_jsonl(data / "dev.jsonl")[0]
    predictor = Predictor(ensemble, "cpu")
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 3
    got = _distributions(run_conversation(predictor, conv, None, "cpu"))
    each = [_distributions(run_conversation(Predictor(b, "cpu"), conv, None, "cpu")) for b in bundles]
    np.testing.assert_allclose(got, np.mean(each, 0), atol=1e-6)
    assert not np.allclose(each[0], each[2], atol=1e-3)  # the members do disagree: the mean is not trivial
    linked = tmp_path / "weights" / "ens-linked"
    from service.offline.ensemble import build_ensemble

    manifest = build_ensemble(bundles, linked, data, device="cpu", link=True, progress=False)
    assert manifest["members"][0]["path"].startswith("..") and not (linked / "members").exists()
    again = _distributions(run_conversation(Predictor(linked, "cpu"), conv, None, "cpu"))
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_evaluate_scores_the_ensemble_and_each_member(members, ensemble: Path, tmp_path: Path) -> None:
    from service.offline.evaluation import evaluate_bundle

    data, _ = members
    metrics = evaluate_bundle(ensemble, data / "dev.jsonl", tmp_path / "eval", device="cpu", progress=False)
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert metrics["weighted_f1"] == manifest["dev_metrics"]["weighted_f1"]
    assert set(metrics["members"]) == {"sdt-a", "sdt-b", "sdt-c"}
    assert (tmp_path / "eval" / "report.md").is_file()


def test_changed_member_or_mismatched_members_are_refused(members, ensemble: Path, tmp_path: Path) -> None:
    from service.inference.predictor import Predictor
    from service.offline.ensemble import build_ensemble

    data, bundles = members
    copy = tmp_path / "ens-tampered"
    shutil.copytree(ensemble, copy)
    weights = copy / "members" / "sdt-a" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sdt-a's weights differ"):
        Predictor(copy, "cpu")
    other = tmp_path / "other-labels"
    shutil.copytree(bundles[0], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "labels": manifest["labels"][::-1]}))
    with pytest.raises(BundleError, match="labels"):
        build_ensemble([bundles[0], other], tmp_path / "bad", data, device="cpu", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(BundleError, match="at least two"):
        build_ensemble([bundles[0]], tmp_path / "bad", data, device="cpu", progress=False)


def test_members_may_differ_in_computed_text_only() -> None:
    text = {"extractor": "minilm-l6-v2", "version": "v1", "dim": 384}
    audio = {"extractor": "opensmile", "version": "eGeMAPSv02", "dim": 88}
    spec, keys = combine_specs(
        [{"text": text, "audio": audio}, {"text": {**text, "version": "v2"}, "audio": audio}], ["a", "b"], ["a", "b"]
    )
    assert set(spec) == {"text", "text~1", "audio"} and keys[1] == {"text": "text~1", "audio": "audio"}
    with pytest.raises(ValueError, match="audio features"):
        combine_specs([{"audio": audio}, {"audio": {**audio, "dim": 25}}], ["a", "b"], ["a", "b"])
    inline = {"extractor": "toy", "version": "inline", "dim": 4}
    with pytest.raises(ValueError, match="computed text features only"):
        combine_specs([{"text": inline}, {"text": text}], ["a", "b"], ["a", "b"])


def test_service_lists_and_serves_the_ensemble_with_append(members, ensemble: Path, tmp_path: Path) -> None:
    from service.inference.pipeline import run_conversation
    from service.inference.predictor import Predictor
    from tests.api.conftest import Server

    _, bundles = members
    server = Server(
        tmp_path / "data", tmp_path / "cache", MERC_WEIGHTS_DIR=str(ensemble.parent), MERC_DEFAULT_MODEL=ensemble.name
    ).start()
    turns = [{"speaker": "Ann", "text": LINES["joy"][0]}, {"speaker": "Bob", "text": LINES["anger"][0]}]
    try:
        with server.client() as api:
            listed = {m["name"]: m for m in api.get("/v1/models").json()["models"]}
            assert listed[ensemble.name]["architecture"] == "ensemble"
            job = api.post("/v1/conversations?wait=60", json={"model": ensemble.name, "utterances": turns})
            assert job.status_code == 200, job.text
            served = _distributions(job.json()["result"])
            new = api.post(
                f"/v1/conversations/{job.json()['id']}/utterances?wait=60",
                json={"utterances": [{"speaker": "Ann", "text": LINES["neutral"][0]}]},
            )
            assert new.status_code == 200, new.text
            appended = _distributions(api.get(f"/v1/conversations/{job.json()['id']}").json()["result"])
    finally:
        server.stop()
    from models.data import Conversation, Utterance

    utts = [Utterance(id=f"u{i}", speaker=t["speaker"], text=t["text"]) for i, t in enumerate(turns)]
    conv = Conversation(id="c", utterances=utts)
    each = [_distributions(run_conversation(Predictor(b, "cpu"), conv, None, "cpu")) for b in bundles]
    np.testing.assert_allclose(served, np.mean(each, 0), atol=1e-5)
    assert appended.shape == (3, 3) and np.allclose(appended.sum(1), 1, atol=1e-4)
