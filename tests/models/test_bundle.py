from pathlib import Path

import pytest
import torch

from models.bundle import BundleError, find_bundle, load_bundle, save_bundle
from tests.models.helpers import random_batch, tiny_model

ARCHS = ["sdt", "summer", "dmd", "iteach"]
MANIFEST = {"labels": ["a", "b", "c"], "feature_spec": {}}


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_and_loaded_bundle_gives_identical_outputs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch).eval()
    model.set_input_stats({m: (torch.randn(d), torch.rand(d) + 0.5) for m, d in model.config.input_dims.items()})
    batch = random_batch(seed=3)
    with torch.no_grad():
        before = model(batch).logits
    save_bundle(tmp_path / "b32", model, MANIFEST, dtype="float32")
    loaded, manifest = load_bundle(tmp_path / "b32")
    assert manifest["architecture"] == arch and manifest["labels"] == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, before, atol=0, rtol=0)
    save_bundle(tmp_path / "b16", model, MANIFEST, dtype="float16")
    half, _ = load_bundle(tmp_path / "b16")
    with torch.no_grad():
        torch.testing.assert_close(half(batch).logits.softmax(-1), before.softmax(-1), atol=2e-2, rtol=0)


def test_bad_bundles_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no bundle"):
        find_bundle("nope", tmp_path)
