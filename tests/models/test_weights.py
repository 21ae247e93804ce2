"""Every committed bundle under weights/ loads, describes itself and predicts."""

from pathlib import Path

import pytest
import torch

from models.bundle import load_bundle, read_manifest
from models.ensemble import is_ensemble, member_dirs
from tests.models.helpers import random_batch

BUNDLES = sorted(p.parent for p in (Path(__file__).resolve().parents[2] / "weights").glob("*/manifest.json"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_committed_bundle_loads_and_predicts(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    if not is_ensemble(manifest):
        _check_bundle(bundle)
        return
    assert {"accuracy", "weighted_f1"} <= set(manifest["dev_metrics"])
    assert manifest["command"].startswith("merc ensemble")
    for member in member_dirs(bundle, manifest):  # an ensemble: each member is a bundle
        _check_bundle(member)


def _check_bundle(bundle: Path) -> None:
    model, manifest = load_bundle(bundle)
    assert set(manifest["feature_spec"]) == set(model.modalities) == set(manifest["modalities"])
    for m, spec in manifest["feature_spec"].items():
        assert spec["dim"] == model.config.input_dims[m] and spec["extractor"] and spec["version"]
    assert len(manifest["labels"]) == model.config.n_classes
    assert {"accuracy", "weighted_f1"} <= set(manifest["dev_metrics"])
    assert manifest["dataset"]["sha256"] and manifest["command"].startswith("merc train")
    batch = random_batch(model.modalities, n_classes=model.config.n_classes, seed=0)
    batch.features = {m: torch.randn(*batch.mask.shape, d) for m, d in model.config.input_dims.items()}
    with torch.no_grad():
        probs = model(batch).logits.softmax(-1)
    assert torch.isfinite(probs[batch.mask]).all()
