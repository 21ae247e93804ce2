"""`merc train`: a dataset folder in, a bundle folder out."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from models.bundle import save_bundle
from models.data import (
    Conversation,
    EncodedConversation,
    encode_conversation,
    file_sha256,
)
from models.registry import make_config, model_class
from models.report import plot_training_curve
from models.train import TrainConfig, fit, resolve_device, score, train_defaults
from service.features.datasets import conversation_features, dataset_feature_spec, encode_dataset
from service.features.speaker_norm import NORM_FILE, SpeakerNormaliser, speaker_normalised
from service.offline.multi_data import TrainingData, load_training_data
from service.offline.text_finetuning import is_finetune_option, prepare_finetuned_text


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
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "finetune": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in out:
            raise ValueError(f"--set {pair!r}: expected model.NAME=VALUE, train.NAME=VALUE or finetune.NAME=VALUE")
        out[section][name] = yaml.safe_load(value)
    return out


def load_yaml_config(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {"model": {}, "train": {}, "finetune": {}}
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"model", "train", "finetune"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (expected model, train, finetune)")
    return {k: dict(raw.get(k) or {}) for k in ("model", "train", "finetune")}


def encode_normalised(
    convs: list[Conversation],
    spec: dict[str, dict],
    labels: list[str],
    n_speakers: int,
    norms: dict[str, SpeakerNormaliser],
    device: str = "auto",
    progress: bool = True,
) -> list[EncodedConversation]:
    """:func:`service.features.datasets.encode_dataset` with ``norms``' modalities normalised per speaker in each
    conversation (the transform service.inference.pipeline.bundle_inputs applies at serve time)."""
    feats = conversation_features(convs, spec, device, progress)
    dims = {m: int(e["dim"]) for m, e in spec.items()}
    out = []
    for conv, f in zip(convs, feats, strict=True):
        f = speaker_normalised(f, [u.speaker for u in conv.utterances], norms)
        out.append(encode_conversation(conv, f, dims, labels, n_speakers))
    return out


def fit_normalisers(
    convs: list[Conversation], spec: dict[str, dict], modalities: list[str], shrink: float, device: str = "auto"
) -> dict[str, SpeakerNormaliser]:
    """Training statistics of each modality to speaker-normalise; its spec entry gains ``normalise``."""
    unknown = set(modalities) - set(spec)
    if unknown:
        raise ValueError(f"--speaker-norm: {sorted(unknown)} are not among the trained modalities {list(spec)}")
    feats = conversation_features(convs, {m: spec[m] for m in modalities}, device, progress=False)
    norms = {}
    for m in modalities:
        vectors = [v for f in feats for v in f[m] if v is not None]
        if not vectors:
            raise ValueError(f"--speaker-norm {m}: no {m} vectors in the training data")
        norms[m] = SpeakerNormaliser.fit(vectors, shrink)
        spec[m] = {**spec[m], "normalise": {"by": "speaker", "shrink": shrink, "file": f"{m}_{NORM_FILE}"}}
    return norms


def sources_summary(data: TrainingData) -> dict[str, Any]:
    """The manifest's record of several training folders (nothing for one folder without options)."""
    if len(data.sources) == 1 and not data.label_map and data.sources[0].modalities is None:
        return {}
    return {"sources": [s.summary() for s in data.sources], "label_map": data.label_map}


def dev_by_dataset(
    model: torch.nn.Module, dev: list[EncodedConversation], data: TrainingData, labels: list[str], device: str
) -> dict[str, Any]:
    """{"dev_metrics_by_dataset": name -> metrics of the trained model on that dataset's dev part} for
    several folders (each with its own modalities, e.g. audio alone for speech sessions); {} for one."""
    if len(data.sources) == 1:
        return {}
    out = {}
    for name, part in data.dev_slices().items():
        convs = dev[part]
        if any((c.labels >= 0).any() for c in convs):
            out[name] = score(model, convs, labels, resolve_device(device))
    return {"dev_metrics_by_dataset": out}


# SDT on fine-tuned text in short multi-party conversations: the recipe measured on MELD (sdt-meld7,
# sdt-meld7-fast: docs/results.md), used for datasets of unknown name shaped like it.
SHORT_CONVERSATION_SDT = ({"lr": 1e-4, "batch_size": 16, "epochs": 40, "patience": 8}, {"temperature": 8.0})


def training_defaults(
    arch: str, name: str, data_dir: Path, finetuned: bool, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train defaults, model defaults) of ``arch`` on dataset ``name``: its family's (models.train) when
    the name is known, else the family its shape resembles (service.offline.text_recipe), said in progress."""
    from models.train import dataset_family
    from service.offline.text_recipe import dataset_shape, fusion_family

    if name.lower().startswith(("meld", "iemocap", "mosi")):
        return asdict(train_defaults(arch, name)), {}
    family, why = fusion_family(dataset_shape(data_dir))
    values, model = asdict(train_defaults(arch, family)), {}
    if arch == "sdt" and family == "meld" and finetuned:
        values.update(SHORT_CONVERSATION_SDT[0])
        model = dict(SHORT_CONVERSATION_SDT[1])
    if progress:
        print(f"merc train: dataset {name!r} is new: {why} ({dataset_family(family)} family)", flush=True)
    return values, model


def train_bundle(
    arch: str,
    data_dir: Path | Sequence[Path],
    out_dir: Path,
    modalities: list[str] | None = None,
    text_encoder: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    dtype: str = "float16",
    progress: bool = True,
    command: str | None = None,
    speaker_norm: list[str] | None = None,
    norm_shrink: float = 4.0,
    finetune_overrides: dict[str, Any] | None = None,
    label_map: dict[str, str | None] | None = None,
    data_modalities: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Train ``arch`` on ``data_dir`` (dataset.json, train.jsonl, dev.jsonl); write a bundle.

    ``data_dir`` may be several folders: their union in the first one's labels, other labels renamed
    by ``label_map``, ``data_modalities`` restricting a dataset's modalities (service/offline/multi_data.py);
    the manifest then lists every source and the dev metrics of each.
    ``speaker_norm``: modalities z-normalised per speaker within each conversation (shrunk towards
    the training statistics with ``norm_shrink`` pseudo-utterances); the spec records it and the
    statistics go into the bundle, so serving normalises the same way.
    """
    folders = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
    data = load_training_data(folders, label_map, data_modalities)
    info, data_dir = data.info, folders[0]
    labels = list(info["labels"])
    finetuned = is_finetune_option(text_encoder)
    spec = dataset_feature_spec(info, modalities, None if finetuned else text_encoder)
    manifest_spec = spec
    if finetuned and "text" in spec:  # fine-tuned, context-aware text: the extractor goes into the bundle
        device = (train_overrides or {}).get("device", "auto")
        spec, manifest_spec = prepare_finetuned_text(
            spec, str(text_encoder), data_dir, out_dir, finetune_overrides, device, progress
        )
    defaults, model_defaults = training_defaults(arch, info.get("name", data_dir.name), data_dir, finetuned, progress)
    cfg_values = {**defaults, **(train_overrides or {})}
    cfg = TrainConfig.from_dict(cfg_values)
    model_cfg = make_config(
        arch,
        {**model_defaults, **(model_overrides or {})},
        input_dims={m: int(e["dim"]) for m, e in spec.items()},
        n_classes=len(labels),
    )
    files = data.files
    train_convs, dev_convs = data.train, data.dev
    n_spk = model_cfg.n_speakers
    norms = fit_normalisers(train_convs, spec, speaker_norm, norm_shrink, cfg.device) if speaker_norm else {}
    for m in norms:  # the manifest's spec too (a fine-tuned text encoder makes it a separate dict)
        manifest_spec[m] = {**manifest_spec[m], "normalise": spec[m]["normalise"]}
    if norms:
        train = encode_normalised(train_convs, spec, labels, n_spk, norms, cfg.device, progress)
        dev = encode_normalised(dev_convs, spec, labels, n_spk, norms, cfg.device, progress)
    else:
        train = encode_dataset(train_convs, spec, labels, n_spk, cfg.device, progress)
        dev = encode_dataset(dev_convs, spec, labels, n_spk, cfg.device, progress)

    torch.manual_seed(cfg.seed)
    model = model_class(arch)(model_cfg)
    started = time.time()
    result = fit(model, train, dev, labels, cfg, progress=progress)
    manifest = {
        "name": out_dir.name,
        "labels": labels,
        "feature_spec": manifest_spec,
        "dataset": {
            "name": info.get("name", data_dir.name),
            "files": [str(f) for f in files],
            "sha256": file_sha256(files),
            "train_utterances": int(sum(len(c) for c in train)),
            "dev_utterances": int(sum(len(c) for c in dev)),
            **sources_summary(data),
        },
        "train_config": asdict(cfg),
        "dev_metrics": result.dev,
        **dev_by_dataset(model, dev, data, labels, cfg.device),
        "best_epochs": result.best_epochs,
        "history": result.history,
        "training_seconds": result.seconds,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "code_version": code_version(),
        "command": command or " ".join(sys.argv),
    }
    save_bundle(out_dir, model, manifest, dtype=dtype)
    for m, norm in norms.items():
        norm.save(out_dir / spec[m]["normalise"]["file"])
    plot_training_curve(result.history, out_dir / "training_curve.png")
    (out_dir / "dev_metrics.json").write_text(json.dumps(result.dev, indent=2) + "\n")
    return manifest


def rebase_text_bundle(bundle_dir: Path, extractor: Path, out_dir: Path, data_dir: Path, command: str = "") -> dict:
    """A copy of ``bundle_dir`` whose fusion model reads ``extractor``'s vectors instead of its own encoder's.

    ``extractor`` must have been distilled from the bundle's text encoder (``merc finetune-text --distill``;
    its finetune.json names the teacher's hash): it stands in for the teacher, so the fusion weights,
    trained on the teacher's vectors, are kept as they are. The new bundle's dev metrics are measured
    with the student (``data_dir``/dev.jsonl); the manifest keeps the original's under ``rebased``.
    """
    import shutil

    from models.bundle import read_manifest
    from service.features.finetuned import spec_entry
    from service.offline.evaluation import evaluate_bundle

    manifest = read_manifest(bundle_dir)
    old = manifest.get("feature_spec", {}).get("text") or {}
    meta = json.loads((Path(extractor) / "finetune.json").read_text())
    teacher = meta.get("distill_sha256")
    if not teacher or teacher != old.get("adapter_sha256"):
        raise ValueError(
            f"{extractor} was not distilled from {bundle_dir}'s text encoder (its teacher: {teacher or 'none'}, "
            f"the bundle's encoder: {old.get('adapter_sha256', 'not a fine-tuned one')})"
        )
    if Path(out_dir).resolve() == Path(bundle_dir).resolve():
        raise ValueError("--out must differ from --bundle")
    if out_dir.exists():  # only an earlier rebase is replaced: never another bundle or folder
        previous = out_dir / "manifest.json"
        if not previous.is_file() or "rebased" not in json.loads(previous.read_text()):
            raise ValueError(f"--out {out_dir} exists and is not a bundle written by merc rebase-text")
        shutil.rmtree(out_dir)
    shutil.copytree(bundle_dir, out_dir, ignore=shutil.ignore_patterns("text_encoder", "dev_metrics.json"))
    shutil.copytree(extractor, out_dir / "text_encoder", ignore=shutil.ignore_patterns("README.md", "oof"))
    rebased = {
        "from_bundle": manifest.get("name", Path(bundle_dir).name),
        "teacher_text": old,
        "teacher_dev_metrics": manifest.get("dev_metrics"),
        "extractor_command": meta.get("command"),
        "extractor_best_dev": meta.get("best_dev"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "command": command or " ".join(sys.argv),
    }
    manifest.update(name=out_dir.name, rebased=rebased)
    manifest["feature_spec"] = {
        **manifest["feature_spec"],
        "text": spec_entry(out_dir / "text_encoder", Path(extractor).name, relative_to=out_dir),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    metrics = evaluate_bundle(out_dir, Path(data_dir) / "dev.jsonl", out_dir / "dev_report", progress=False)
    meta_keys = ("bundle", "architecture", "data", "dropped_modalities")
    manifest["dev_metrics"] = {k: v for k, v in metrics.items() if k not in meta_keys}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "dev_metrics.json").write_text(json.dumps(manifest["dev_metrics"], indent=2) + "\n")
    shutil.rmtree(out_dir / "dev_report")
    return manifest
