"""Bundles: a folder with ``model.safetensors`` and a self-describing ``manifest.json``.

Like whisper's checkpoints, a bundle carries its own dimensions: architecture name,
model config, label names in class order, and the feature spec per modality (which
extractor, version and dimension produced each input), plus metrics and provenance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from models.common import FusionModel
from models.registry import create_model

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle folder that cannot be loaded; the message says why."""


def save_bundle(out_dir: str | Path, model: FusionModel, manifest: dict[str, Any], dtype: str = "float16") -> Path:
    """Write weights (``dtype``: float16 or float32) and the manifest. Returns the folder.

    ``manifest`` must hold at least ``labels`` and ``feature_spec``; architecture and
    config are filled from the model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key in ("labels", "feature_spec"):
        if key not in manifest:
            raise BundleError(f"manifest needs {key!r}")
    to_save = copy.deepcopy(model).cpu()
    if dtype == "float16":
        to_save = to_save.half()
    elif dtype != "float32":
        raise BundleError(f"unsupported dtype {dtype!r}")
    st_save_model(to_save, str(out / WEIGHTS))
    full = {
        "format_version": FORMAT_VERSION,
        "architecture": model.arch_name,  # type: ignore[attr-defined]
        "config": model.config.to_dict(),
        "modalities": list(model.modalities),
        "weights_dtype": dtype,
        **manifest,
    }
    (out / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return out


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST} (not a bundle folder)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: invalid JSON ({e.msg})") from None
    for key in ("architecture", "config", "labels", "feature_spec"):
        if key not in manifest:
            raise BundleError(f"{path}: missing {key!r}")
    return manifest


def load_bundle(bundle_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FusionModel, dict[str, Any]]:
    """The model (float32, eval mode, on ``device``) and its manifest."""
    manifest = read_manifest(bundle_dir)
    if manifest["architecture"] == "ensemble":  # models.ensemble: no weights of its own
        raise BundleError(
            f"{bundle_dir} is an ensemble bundle: load its members (models.ensemble.member_dirs), or serve and "
            "evaluate it through merc (service.inference.predictor.Predictor, merc evaluate)"
        )
    model = create_model(manifest["architecture"], manifest["config"])
    weights = Path(bundle_dir) / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"{bundle_dir}: no {WEIGHTS}")
    missing, unexpected = st_load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.float().to(device).eval(), manifest


def find_bundle(name_or_path: str | Path, weights_dir: str | Path = "weights") -> Path:
    """A bundle folder from a path, or a name under ``weights_dir`` (e.g. 'sdt-meld7')."""
    path = Path(name_or_path)
    if (path / MANIFEST).is_file():
        return path
    candidate = Path(weights_dir) / str(name_or_path)
    if (candidate / MANIFEST).is_file():
        return candidate
    available = sorted(p.parent.name for p in Path(weights_dir).glob(f"*/{MANIFEST}"))
    raise BundleError(f"no bundle {str(name_or_path)!r}; available in {weights_dir}: {available}")


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", weights_dir: str | Path = "weights"):
    """whisper-style entry point: ``load_model("sdt-meld7")`` -> (model, manifest)."""
    return load_bundle(find_bundle(name_or_path, weights_dir), device)
