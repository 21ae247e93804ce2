"""`merc evaluate`: a bundle and a canonical JSONL file in, metrics and a report out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import load_bundle, read_manifest
from models.data import DataError, read_jsonl
from models.ensemble import feature_modality, is_ensemble, mean_probabilities, member_dirs
from models.metrics import SUMMARY_KEYS, missing_rate_summary
from models.report import write_report
from models.train import predict, probability_metrics, resolve_device
from service.features.datasets import absent_as_inline, encode_dataset, media_absent
from service.features.speaker_norm import bundle_normalisers
from service.offline.multi_data import map_labels
from service.offline.training import encode_normalised


def encoded_for_bundle(bundle_dir: Path, convs, labels: list[str], dev, progress: bool):
    """A (non-ensemble) bundle's model and ``convs`` encoded as it reads them (its features, its transform)."""
    from service.features.finetuned import absolute_spec

    model, manifest = load_bundle(bundle_dir, dev)
    spec = absent_as_inline(absolute_spec(manifest["feature_spec"], bundle_dir), convs)  # text-only files too
    norms = bundle_normalisers(spec, bundle_dir)
    if norms:  # the bundle was trained on speaker-normalised features: the same transform here
        encoded = encode_normalised(convs, spec, labels, model.config.n_speakers, norms, str(dev), progress)
    else:
        encoded = encode_dataset(convs, spec, labels, model.config.n_speakers, str(dev), progress)
    return model, encoded


def evaluate_bundle(
    bundle_dir: Path,
    data_file: Path,
    out_dir: Path,
    missing_rates: Sequence[float] = (),
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    drop: Sequence[str] = (),
    label_map: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Score a bundle on a labelled file; write metrics.json and report.md into ``out_dir``.

    ``drop`` removes modalities from every utterance (e.g. to see what audio and visual
    alone carry in a trimodal model); ``label_map`` renames the file's labels onto the bundle's
    (None: left unlabelled), as ``merc train --label-map`` does. An ensemble bundle (models.ensemble)
    is scored on its members' mean distributions; ``members`` gives each member's own figures."""
    dev = resolve_device(device)
    manifest = read_manifest(bundle_dir)
    labels = manifest["labels"]
    convs = read_jsonl(data_file)
    if label_map:
        map_labels(convs, label_map, labels, str(data_file))
    ensemble = is_ensemble(manifest)
    dirs = member_dirs(bundle_dir, manifest) if ensemble else [Path(bundle_dir)]
    members = [encoded_for_bundle(d, convs, labels, dev, progress) for d in dirs]
    modalities = {m for model, _ in members for m in model.modalities}
    unknown = set(drop) - modalities
    if unknown:
        raise ValueError(f"--drop: the bundle has no modality {sorted(unknown)}; it uses {sorted(modalities)}")
    encoded = members[0][1]  # the same conversations and labels in every member's encoding
    if not any((c.labels >= 0).any() for c in encoded):
        raise DataError(f"{data_file}: no labelled utterances to evaluate")

    def scored(rate: float) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
        per = [predict(m, e, device=dev, missing_rate=rate, seed=seed, drop=drop) for m, e in members]
        return probability_metrics(mean_probabilities(per), encoded, labels), per

    overall, per_member = scored(0.0)
    metrics: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "architecture": manifest["architecture"],
        "data": str(data_file),
        "dropped_modalities": list(drop),
        "absent_modalities": media_absent(media_entries(manifest), convs),
        **overall,
    }
    if ensemble:
        metrics["members"] = {
            member["name"]: {k: v for k, v in probability_metrics(p, encoded, labels).items() if k in SUMMARY_KEYS}
            for member, p in zip(manifest["members"], per_member, strict=True)
        }
    if missing_rates:
        per_rate = {f"{r:.2f}": scored(r)[0] for r in missing_rates}
        metrics["missing_rates"] = per_rate
        metrics["missing_rate_average"] = missing_rate_summary({float(k): v for k, v in per_rate.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir, metrics, manifest, title=f"{manifest.get('name', bundle_dir.name)} on {data_file.name}")
    return metrics


def media_entries(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The feature spec without text entries (an ensemble's ``text~1`` ... included): what may be absent."""
    return {k: e for k, e in (manifest.get("feature_spec") or {}).items() if feature_modality(k) != "text"}
