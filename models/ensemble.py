"""Ensemble bundles: a manifest naming member bundles whose per-utterance distributions are averaged.

Layout::

    NAME/manifest.json       architecture "ensemble"; ``members``: each member's path (relative to
                             NAME), the sha256 of its weights, which feature key each of its
                             modalities reads, its dev figures; ``feature_spec``: one entry per
                             distinct feature the members read (key -> entry)
    NAME/members/<member>/   copies of the member bundles (or relative paths to bundles beside NAME)
    NAME/dev_metrics.json    the ensemble's dev metrics

Feature keys: members agree on every modality but text (the same extractor entry, or the modality
absent); their text extractors may differ (e.g. one fine-tuned extractor per seed). The first
distinct text entry is read under the key ``"text"``, the next under ``"text~1"``, and so on; each
member reads its own. Entries keep what identifies the vectors; where a member keeps its files
(``adapter``) becomes relative to NAME, and a member's own input transform (``normalise``) stays
with the member, which applies it.

Pure Python/numpy: never imports ``service/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import WEIGHTS, BundleError
from models.common import MODALITIES
from models.data import file_sha256

__all__ = [
    "ENSEMBLE",
    "combine_specs",
    "ensemble_modalities",
    "feature_modality",
    "is_ensemble",
    "mean_probabilities",
    "member_dirs",
]

ENSEMBLE = "ensemble"
SEP = "~"
_MEMBER_OWN = ("adapter", "normalise", "oof_features")  # where a member keeps files; its own transform


def feature_modality(key: str) -> str:
    """The modality a feature key carries: ``"text~1"`` -> ``"text"``."""
    return key.split(SEP, 1)[0]


def is_ensemble(manifest: dict[str, Any]) -> bool:
    return manifest.get("architecture") == ENSEMBLE


def _identity(entry: dict[str, Any]) -> dict[str, Any]:
    """What makes two entries give the same vectors (their files' hash included, not their place)."""
    return {k: v for k, v in entry.items() if k not in _MEMBER_OWN}


def combine_specs(
    specs: Sequence[dict[str, dict[str, Any]]], paths: Sequence[str], names: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """The ensemble's feature spec and, per member, modality -> feature key.

    ``specs``: the members' manifest feature specs (adapter paths relative to the member); ``paths``:
    each member's folder relative to the ensemble. ValueError where members differ in a modality other
    than text, or in inline text (a request carries one vector per modality)."""
    combined: dict[str, dict[str, Any]] = {}
    keys: list[dict[str, str]] = []
    for spec, path, name in zip(specs, paths, names, strict=True):
        mine = {}
        for m, entry in spec.items():
            same = [k for k, e in combined.items() if feature_modality(k) == m]
            key = next((k for k in same if _identity(combined[k]) == _identity(entry)), None)
            if key is None:
                if same and (m != "text" or "inline" in (entry.get("version"), combined[same[0]].get("version"))):
                    raise ValueError(
                        f"member {name}: its {m} features ({entry.get('extractor')} {entry.get('version')}) differ "
                        "from another member's; ensemble members may differ in their computed text features only"
                    )
                key = f"{m}{SEP}{len(same)}" if same else m
                combined[key] = {k: v for k, v in entry.items() if k not in ("normalise", "oof_features")}
                if "adapter" in entry and not Path(entry["adapter"]).is_absolute():
                    combined[key]["adapter"] = str(Path(path) / entry["adapter"])
            mine[m] = key
        keys.append(mine)
    return combined, keys


def ensemble_modalities(keys: Sequence[dict[str, str]]) -> list[str]:
    """Every modality some member reads, in MODALITIES order."""
    return [m for m in MODALITIES if any(m in k for k in keys)]


def member_dirs(bundle_dir: str | Path, manifest: dict[str, Any], verify: bool = True) -> list[Path]:
    """The members' folders; with ``verify``, BundleError where a member's weights are not the ones the
    ensemble was built from (sha256 of ``model.safetensors``)."""
    out = []
    for member in manifest["members"]:
        where = (Path(bundle_dir) / member["path"]).resolve()
        weights = where / WEIGHTS
        if not weights.is_file():
            raise BundleError(f"ensemble {bundle_dir}: member {member['name']} is missing ({where})")
        if verify and file_sha256([weights]) != member["weights_sha256"]:
            raise BundleError(
                f"ensemble {bundle_dir}: member {member['name']}'s weights differ from the ones it was built from"
            )
        out.append(where)
    return out


def mean_probabilities(per_member: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The mean distribution per utterance: per member a list of (n_i, C) arrays -> a list of (n_i, C)."""
    if len(per_member) == 1:
        return list(per_member[0])
    return [np.mean(np.stack(parts), 0).astype(np.float32) for parts in zip(*per_member, strict=True)]
