"""`merc evaluate`: a bundle and a canonical JSONL file in, metrics and a report out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.bundle import load_bundle
from models.data import DataError, read_jsonl
from models.metrics import missing_rate_summary
from models.report import write_report
from models.train import resolve_device, score
from service.features.datasets import absent_as_inline, encode_dataset, media_absent
from service.features.speaker_norm import bundle_normalisers
from service.offline.multi_data import map_labels
from service.offline.training import encode_normalised


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
    (None: left unlabelled), as ``merc train --label-map`` does."""
    dev = resolve_device(device)
    model, manifest = load_bundle(bundle_dir, dev)
    unknown = set(drop) - set(model.modalities)
    if unknown:
        raise ValueError(f"--drop: the bundle has no modality {sorted(unknown)}; it uses {list(model.modalities)}")
    labels = manifest["labels"]
    convs = read_jsonl(data_file)
    if label_map:
        map_labels(convs, label_map, labels, str(data_file))
    from service.features.finetuned import absolute_spec

    spec = absent_as_inline(absolute_spec(manifest["feature_spec"], bundle_dir), convs)  # text-only files too
    norms = bundle_normalisers(spec, bundle_dir)
    if norms:  # the bundle was trained on speaker-normalised features: the same transform here
        encoded = encode_normalised(convs, spec, labels, model.config.n_speakers, norms, str(dev), progress)
    else:
        encoded = encode_dataset(convs, spec, labels, model.config.n_speakers, str(dev), progress)
    if not any((c.labels >= 0).any() for c in encoded):
        raise DataError(f"{data_file}: no labelled utterances to evaluate")
    metrics: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "architecture": manifest["architecture"],
        "data": str(data_file),
        "dropped_modalities": list(drop),
        "absent_modalities": media_absent(manifest.get("feature_spec") or {}, convs),
        **score(model, encoded, labels, dev, seed=seed, drop=drop),
    }
    if missing_rates:
        per_rate = {
            f"{r:.2f}": score(model, encoded, labels, dev, missing_rate=r, seed=seed, drop=drop) for r in missing_rates
        }
        metrics["missing_rates"] = per_rate
        metrics["missing_rate_average"] = missing_rate_summary({float(k): v for k, v in per_rate.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir, metrics, manifest, title=f"{manifest.get('name', bundle_dir.name)} on {data_file.name}")
    return metrics
