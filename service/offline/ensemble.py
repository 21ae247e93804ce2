"""`merc ensemble`: an ensemble bundle (models.ensemble) from trained member bundles, scored on dev.

The members are copied into ``OUT/members/<name>/`` (the folder is self-contained, and its members'
weights are checked by hash when it loads), or, with ``link``, named by their path relative to OUT
(bundles beside it under weights/: no second copy). The ensemble is then evaluated on the dataset's
dev split with ``merc evaluate``'s code path; the manifest records the ensemble's dev figures and each
member's, measured in the same pass.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.bundle import MANIFEST, WEIGHTS, BundleError, read_manifest
from models.data import DataError, file_sha256, read_dataset_info
from models.ensemble import ENSEMBLE, combine_specs, ensemble_modalities, is_ensemble


def _member_names(members: Sequence[Path]) -> list[str]:
    """Folder names, made unique with -2, -3, ... where two members share one."""
    names: list[str] = []
    for p in members:
        name, k = p.name, 2
        while name in names:
            name, k = f"{p.name}-{k}", k + 1
        names.append(name)
    return names


def _check_members(members: Sequence[Path]) -> list[dict[str, Any]]:
    """The members' manifests; BundleError for fewer than two, a nested ensemble or other labels."""
    if len(members) < 2:
        raise BundleError("--members: an ensemble needs at least two bundles")
    manifests = [read_manifest(p) for p in members]
    for p, m in zip(members, manifests, strict=True):
        if is_ensemble(m):
            raise BundleError(f"--members {p}: an ensemble cannot be a member (list its members instead)")
        if not (p / WEIGHTS).is_file():
            raise BundleError(f"--members {p}: no {WEIGHTS}")
        if m["labels"] != manifests[0]["labels"]:
            raise BundleError(
                f"--members {p}: labels {m['labels']} differ from {members[0]}'s {manifests[0]['labels']} "
                "(members must predict the same classes in the same order)"
            )
    return manifests


def build_ensemble(
    members: Sequence[Path],
    out: Path,
    data: Path,
    device: str = "auto",
    link: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Write the ensemble bundle ``out`` of ``members`` and score it on ``data``/dev.jsonl; its manifest."""
    members = [Path(p) for p in members]
    manifests = _check_members(members)
    dev_file = Path(data) / "dev.jsonl"
    if not dev_file.is_file():
        raise DataError(f"--data {data}: no dev.jsonl to score the ensemble on")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"--out {out} exists and is not empty: remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(members, manifests, out, data, dev_file, device, link, progress, command)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # it was empty or absent: no half-built bundle stays
        raise


def _build(
    members: list[Path],
    manifests: list[dict[str, Any]],
    out: Path,
    data: Path,
    dev_file: Path,
    device: str,
    link: bool,
    progress: bool,
    command: str,
) -> dict[str, Any]:
    """:func:`build_ensemble` once the inputs are checked and ``out`` exists (empty)."""
    from service.offline.evaluation import evaluate_bundle
    from service.offline.training import code_version

    names = _member_names(members)
    paths = []
    for p, name in zip(members, names, strict=True):
        if link:
            paths.append(os.path.relpath(p.resolve(), out.resolve()))
        else:
            shutil.copytree(p, out / "members" / name)
            paths.append(f"members/{name}")
    spec, keys = combine_specs([m["feature_spec"] for m in manifests], paths, names)
    manifest: dict[str, Any] = {
        "format_version": 1,
        "name": out.name,
        "architecture": ENSEMBLE,
        "config": {"combine": "mean of the members' probabilities", "members": paths},
        "modalities": ensemble_modalities(keys),
        "labels": list(manifests[0]["labels"]),
        "feature_spec": spec,
        "members": [
            {
                "name": name,
                "path": path,
                "architecture": m["architecture"],
                "features": k,
                "weights_sha256": file_sha256([out / path / WEIGHTS]),
                "dev_metrics_at_training": m.get("dev_metrics", {}),
            }
            for name, path, m, k in zip(names, paths, manifests, keys, strict=True)
        ],
        "dataset": {
            "name": read_dataset_info(data).get("name", Path(data).name),
            "dev_sha256": file_sha256([dev_file]),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "command": command or " ".join(sys.argv),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    metrics = evaluate_bundle(out, dev_file, out / "dev_eval", device=device, progress=progress)
    skip = ("bundle", "data", "members", "architecture", "dropped_modalities")
    manifest["dev_metrics"] = {k: v for k, v in metrics.items() if k not in skip}
    for entry in manifest["members"]:
        entry["dev_metrics"] = metrics["members"][entry["name"]]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "dev_metrics.json").write_text(json.dumps(manifest["dev_metrics"], indent=2) + "\n")
    shutil.rmtree(out / "dev_eval")  # metrics.json / report.md of the pass above: in the manifest now
    return manifest
