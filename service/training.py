"""`merc train`: a dataset folder in, a bundle folder out."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from models.bundle import save_bundle
from models.data import file_sha256, read_dataset_info, read_jsonl
from models.registry import make_config, model_class
from models.report import plot_training_curve
from models.train import TrainConfig, fit, train_defaults
from service.datasets import dataset_feature_spec, encode_dataset


def code_version() -> dict[str, str]:
    """Package version and, when run from a git checkout, the commit."""
    from importlib.metadata import version

    info = {"merc": version("merc"), "torch": torch.__version__, "python": platform.python_version()}
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if commit:
            info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """["model.hidden=256", "train.lr=1e-4"] -> {"model": {...}, "train": {...}} (YAML-typed values)."""
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in out:
            raise ValueError(f"--set {pair!r}: expected model.NAME=VALUE or train.NAME=VALUE")
        out[section][name] = yaml.safe_load(value)
    return out


def load_yaml_config(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {"model": {}, "train": {}}
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (expected model, train)")
    return {"model": dict(raw.get("model") or {}), "train": dict(raw.get("train") or {})}


def train_bundle(
    arch: str,
    data_dir: Path,
    out_dir: Path,
    modalities: list[str] | None = None,
    text_encoder: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    dtype: str = "float16",
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train ``arch`` on ``data_dir`` (dataset.json, train.jsonl, dev.jsonl); write a bundle."""
    info = read_dataset_info(data_dir)
    labels = list(info["labels"])
    spec = dataset_feature_spec(info, modalities, text_encoder)
    cfg_values = asdict(train_defaults(arch, info.get("name", data_dir.name)))
    cfg_values.update(train_overrides or {})
    cfg = TrainConfig.from_dict(cfg_values)
    model_cfg = make_config(
        arch,
        model_overrides or {},
        input_dims={m: int(e["dim"]) for m, e in spec.items()},
        n_classes=len(labels),
    )
    files = [data_dir / "train.jsonl", data_dir / "dev.jsonl"]
    train_convs, dev_convs = read_jsonl(files[0]), read_jsonl(files[1])
    n_spk = model_cfg.n_speakers
    train = encode_dataset(train_convs, spec, labels, n_spk, cfg.device, progress)
    dev = encode_dataset(dev_convs, spec, labels, n_spk, cfg.device, progress)

    torch.manual_seed(cfg.seed)
    model = model_class(arch)(model_cfg)
    started = time.time()
    result = fit(model, train, dev, labels, cfg, progress=progress)
    manifest = {
        "name": out_dir.name,
        "labels": labels,
        "feature_spec": spec,
        "dataset": {
            "name": info.get("name", data_dir.name),
            "files": [str(f) for f in files],
            "sha256": file_sha256(files),
            "train_utterances": int(sum(len(c) for c in train)),
            "dev_utterances": int(sum(len(c) for c in dev)),
        },
        "train_config": asdict(cfg),
        "dev_metrics": result.dev,
        "best_epochs": result.best_epochs,
        "history": result.history,
        "training_seconds": result.seconds,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "code_version": code_version(),
        "command": command or " ".join(sys.argv),
    }
    save_bundle(out_dir, model, manifest, dtype=dtype)
    plot_training_curve(result.history, out_dir / "training_curve.png")
    (out_dir / "dev_metrics.json").write_text(json.dumps(result.dev, indent=2) + "\n")
    return manifest
