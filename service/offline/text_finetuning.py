"""`merc finetune-text`: fine-tune a packaged (or local / Hugging Face) text encoder on a dataset folder.

Writes a reusable *text extractor* directory::

    OUT/adapter/              LoRA adapter (peft) over the base weights (or encoder/ for a full fine-tune)
    OUT/head.safetensors      the linear emotion head (the encoder's own classifier)
    OUT/finetune.json         base encoder + version, context window, pooling, labels, config,
                              dev metrics, history, seconds per epoch, the reproducing command

Bundles name it in their text feature spec (see :mod:`service.features.finetuned`) with the
content hash of those files, so changed or missing files are refused, never silently used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.data import DataError, read_dataset_info, read_jsonl
from models.text_checkpoint import Checkpointing, discard, read_summary
from models.text_finetune import (
    ContextWindow,
    FineTuneConfig,
    conversation_inputs,
    finetune_text_encoder,
    save_adapter,
)


def _fit(
    encoder,
    tokenizer,
    dim: int,
    train,
    dev,
    labels: list[str],
    cfg: FineTuneConfig,
    device: str,
    progress: bool,
    prefix: str,
    targets=None,
    checkpoint: Checkpointing | None = None,
):
    """:func:`finetune_text_encoder` on conversations (context windows and label indices built here)."""
    return finetune_text_encoder(
        encoder,
        tokenizer,
        dim,
        (conversation_inputs(train, cfg.window), _labels_of(train, labels)),
        (conversation_inputs(dev, cfg.window), _labels_of(dev, labels)),
        labels,
        cfg,
        device=device,
        progress=(lambda s: print(prefix + s, flush=True)) if progress else None,
        show_bar=progress,
        targets=targets,
        checkpoint=checkpoint,
    )


def teacher_vectors(teacher: str | Path, splits, device: str) -> tuple[list[np.ndarray], ...]:
    """The teacher extractor's vectors (the serving code path, embedding cache on) of every conversation's
    turns with text, per split: a list of (n, H) float32 arrays per conversation, for distillation."""
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    directory = Path(teacher)
    if not (directory / "finetune.json").is_file():
        raise DataError(f"--distill {teacher}: not a fine-tuned text extractor folder (no finetune.json)")
    encoder = FinetunedTextEncoder(spec_entry(directory, directory.name), directory, device)
    out = []
    for convs in splits:
        rows = encoder.conversation_vectors(convs, future_known=False)
        out.append([np.array([v for v in r if v is not None], np.float32).reshape(-1, encoder.dim) for r in rows])
    return tuple(out)


def _best(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The selected evaluation: highest ``dev_selection`` (dev weighted F1, or minus the distillation error)."""
    return max(history, key=lambda h: h.get("dev_selection", h["dev_weighted_f1"])) if history else None


def _labels_of(convs, labels: list[str]) -> list[list[int]]:
    index = {label: i for i, label in enumerate(labels)}
    return [[index.get(u.label, -1) if u.label is not None else -1 for u in c.utterances] for c in convs]


def check_positions(window: ContextWindow, config: Any) -> None:
    """A conversation-mode chunk ([CLS] + past + chunk turns of up to ``turn_tokens`` tokens and a [SEP])
    must fit the encoder's position table, or training fails on the first long chunk: refuse up front,
    naming the largest --turn-tokens that fits."""
    if window.mode != "conversation":
        return
    offset = 2 if getattr(config, "model_type", "") in ("mpnet", "roberta", "xlm-roberta") else 0  # padding idx
    positions = int(getattr(config, "max_position_embeddings", 512)) - offset
    turns = window.past + window.chunk
    if turns * (window.turn_tokens + 1) + 1 > positions:
        fits = (positions - 1) // turns - 1
        raise ValueError(
            f"--past {window.past} + --chunk {window.chunk} turns of --turn-tokens {window.turn_tokens} exceed the "
            f"encoder's {positions} positions: use --turn-tokens {fits} or fewer (or fewer turns)"
        )


def finetune_text(
    data: Path,
    base: str,
    out: Path,
    cfg: FineTuneConfig,
    device: str = "auto",
    progress: bool = True,
    command: str = "",
    cache_features: bool = True,
    checkpoint: Checkpointing | None = None,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``base`` for utterance emotion classification on ``data``; returns the finetune.json dict.

    ``checkpoint``: write resumable checkpoints (or continue one, ``checkpoint.resume``); once the
    extractor is saved its files are removed unless ``keep_checkpoint``. Raises
    :class:`models.text_checkpoint.TrainingStopped` where the policy stops the run early.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from models.train import resolve_device
    from service.features.finetuned import extractor_hash
    from service.features.text import _resolve_source

    info = read_dataset_info(data)
    labels = list(info["labels"])
    train = read_jsonl(Path(data) / "train.jsonl")
    dev = read_jsonl(Path(data) / "dev.jsonl")
    if not train or not dev:
        raise DataError(f"{data}: fine-tuning needs non-empty train.jsonl and dev.jsonl")
    dev_name = str(resolve_device(device))
    source = _resolve_source(base, None)
    directory = Path(source.locate())
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(directory), local_files_only=True)
    check_positions(cfg.window, encoder.config)
    started = time.perf_counter()
    earlier = (
        (read_summary(checkpoint.directory) or {}).get("seconds", 0.0) if checkpoint and checkpoint.resume else 0.0
    )
    targets = teacher_vectors(cfg.distill, [train, dev], dev_name) if cfg.distill else None
    model, history = _fit(
        encoder, tokenizer, source.dim, train, dev, labels, cfg, dev_name, progress, "", targets, checkpoint
    )
    seconds = time.perf_counter() - started + earlier  # a resumed run: the earlier sessions' training too
    base_info = {"name": source.extractor, "version": source.version, "dim": source.dim}
    save_adapter(model.to("cpu"), cfg, out, base_info)
    meta = json.loads((Path(out) / "finetune.json").read_text())
    epochs_run = max(h["epoch"] for h in history) if history else 0
    meta.update(
        labels=labels,
        dataset=info.get("name", Path(data).name),
        best_dev=_best(history),
        history=history,
        seconds=round(seconds, 1),
        seconds_per_epoch=round(seconds / max(1, epochs_run), 1),
        device=dev_name,
        torch_threads=torch.get_num_threads(),
        command=command,
    )
    if cfg.init:  # the warm start's identity: its files' hash
        meta["init_sha256"] = extractor_hash(cfg.init)
    if cfg.distill:
        meta["distill_sha256"] = extractor_hash(cfg.distill)
    (Path(out) / "finetune.json").write_text(json.dumps(meta, indent=2))
    meta["sha256"] = extractor_hash(out)
    if checkpoint is not None and not keep_checkpoint:
        discard(checkpoint.directory)
    if cache_features:
        _warm_cache(out, [train, dev], dev_name)
    return meta


def _warm_cache(directory: Path, splits, device: str) -> None:
    """Encode train and dev with the saved extractor (the serving code path) into the embedding cache."""
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    entry = spec_entry(directory, Path(directory).name)
    encoder = FinetunedTextEncoder(entry, Path(directory), device)
    for convs in splits:
        encoder.conversation_vectors(convs, future_known=True)


def window_from_options(
    past: int,
    future: int,
    speaker: bool,
    max_length: int,
    mode: str = "pairs",
    chunk: int = 4,
    turn_tokens: int = 48,
    windowed: bool = False,
) -> ContextWindow:
    """The context window of the command-line options (validated)."""
    if past < 0 or future < 0 or max_length < 8:
        raise ValueError("--past/--future must be >= 0 and --max-length >= 8")
    if windowed and mode != "conversation":
        raise ValueError("--windowed is an option of --mode conversation")
    return ContextWindow(past, future, speaker, max_length, mode, chunk, turn_tokens, windowed)


def is_finetune_option(text_encoder: str | None) -> bool:
    """``finetune:BASE`` or a directory holding a fine-tuned extractor (finetune.json)."""
    if not text_encoder:
        return False
    return text_encoder.startswith("finetune:") or (Path(text_encoder) / "finetune.json").is_file()


def prepare_finetuned_text(
    spec: dict[str, dict[str, Any]],
    text_encoder: str,
    data_dir: Path,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Put the fine-tuned text extractor into ``out_dir/text_encoder`` (fine-tuning it first for
    ``finetune:BASE``, copying a given extractor directory otherwise).

    Returns ``(spec to compute features with (absolute adapter path), spec for the manifest (relative))``.
    """
    import shutil

    from service.features.finetuned import spec_entry
    from service.offline.text_recipe import dataset_shape, text_recipe

    target = Path(out_dir) / "text_encoder"
    overrides = dict(overrides or {})
    oof = overrides.pop("oof", False)
    folds = 2 if oof is True else int(oof or 0)
    if text_encoder.startswith("finetune:"):
        base = text_encoder.split(":", 1)[1]
        chosen, why = text_recipe(dataset_shape(data_dir))
        chosen = {k: v for k, v in chosen.items() if k not in overrides}
        if progress:
            print(f"merc train: text fine-tune of {base}: {why} (given: {sorted(overrides) or 'none'})", flush=True)
        values = {**FineTuneConfig().to_dict(), **chosen, **overrides}
        window = {
            **values["window"],
            **{k: values.pop(k) for k in ContextWindow.__dataclass_fields__ if k in values},
        }
        cfg = FineTuneConfig.from_dict({**values, "window": window})
        if target.exists():
            shutil.rmtree(target)
        finetune_text(data_dir, base, target, cfg, device, progress, command="(merc train --text-encoder)")
        name = f"{Path(data_dir).name}-{base.replace('/', '_')}"
        if folds:
            oof_features(target, Path(data_dir), folds, device, progress)
    else:
        source = Path(text_encoder).resolve()
        if source != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("README.md", "oof", "checkpoint"))
        name = source.name
        if folds and not (source / OOF_FILE).is_file():
            raise DataError(f"--set finetune.oof: {source} has no {OOF_FILE}; run merc oof-text-features first")
    relative = spec_entry(target, name, relative_to=out_dir)
    absolute = {**relative, "adapter": str(target.resolve())}
    if folds:  # train-split vectors from the fold models; dev and everything after use the extractor
        where = (target if text_encoder.startswith("finetune:") else Path(text_encoder).resolve()) / OOF_FILE
        absolute["oof_features"] = str(where)
    return {**spec, "text": absolute}, {**spec, "text": relative}


OOF_FILE = Path("oof") / "train_features.npz"


def oof_features(
    extractor: Path,
    data: Path,
    folds: int = 2,
    device: str = "auto",
    progress: bool = True,
    epochs: int | None = None,
    only_fold: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Out-of-fold train features for ``extractor``: K fine-tunes (same base, window and seed), each on
    K-1 folds of the train conversations, encoding the fold it did not see through the serving code
    path (:class:`service.features.finetuned.FinetunedTextEncoder`, pair or conversation mode).

    Fold models always start from the base encoder, even when the extractor was warm-started
    (``init``): the warm start saw every train label, so starting from it would leak the held fold's
    labels. ``overrides`` (e.g. ``{"lr": 5e-4}``, the cold recipe) and ``epochs`` change the fold
    recipe; both are recorded in ``oof/oof.json``.

    Each fold is written to ``oof/fold-K.npz`` as it finishes (``only_fold``: fit that fold alone, so
    folds can run in parallel processes); once every fold is there they are merged into
    ``extractor/oof/train_features.npz`` (conversation id -> (n, dim) float16, NaN rows for utterances
    without text), which ``merc train --set finetune.oof=true`` trains the fusion model on (dev, test
    and serving use the extractor itself). Not part of the extractor's hash: derived data that stays on
    this host (it is made of the dataset's text). Returns the merged file, or the fold's file.
    """
    import numpy as np

    meta = json.loads((extractor / "finetune.json").read_text())
    values = {**meta["config"], **(overrides or {}), "init": None}
    if epochs is not None:  # e.g. the epoch the full fine-tune was selected at
        values["epochs"] = epochs
    cfg = FineTuneConfig.from_dict(values)
    train = read_jsonl(data / "train.jsonl")
    order = sorted(range(len(train)), key=lambda i: train[i].id)
    fold_of = {train[i].id: k % folds for k, i in enumerate(order)}
    where = extractor / OOF_FILE.parent
    where.mkdir(parents=True, exist_ok=True)
    recipe = {"folds": folds, "config": cfg.to_dict(), "extractor": meta.get("base", {})}
    for k in [only_fold] if only_fold is not None else range(folds):
        part = where / f"fold-{k}.npz"
        if part.is_file() and json.loads((where / f"fold-{k}.json").read_text()).get("recipe") == recipe:
            continue  # done by an earlier (or parallel) run with the same recipe
        vectors, report = _oof_fold(
            meta,
            cfg,
            data,
            [c for c in train if fold_of[c.id] != k],
            [c for c in train if fold_of[c.id] == k],
            device,
            progress,
            f"fold {k}: ",
        )
        np.savez_compressed(part, **vectors)
        (where / f"fold-{k}.json").write_text(json.dumps({"fold": k, "recipe": recipe, **report}, indent=2))
    if only_fold is not None:
        return where / f"fold-{only_fold}.npz"
    out: dict[str, np.ndarray] = {}
    reports = []
    for k in range(folds):
        with np.load(where / f"fold-{k}.npz") as part:
            out.update({name: part[name] for name in part.files})
        reports.append(json.loads((where / f"fold-{k}.json").read_text()))
    path = extractor / OOF_FILE
    np.savez_compressed(path, **out)
    (where / "oof.json").write_text(json.dumps({**recipe, "report": reports}, indent=2))
    return path


def _oof_fold(meta, cfg: FineTuneConfig, data: Path, seen, held, device: str, progress: bool, prefix: str):
    """Fine-tune on ``seen``, encode ``held``: ``({conversation id: (n, dim) float16}, report)``."""
    import tempfile

    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    from models.text_finetune import seed_everything
    from models.train import resolve_device
    from service.features.finetuned import FinetunedTextEncoder, spec_entry
    from service.features.text import _resolve_source

    seed_everything(cfg.seed)
    source = _resolve_source(meta["base"]["name"], None)
    tokenizer = AutoTokenizer.from_pretrained(str(source.locate()), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(source.locate()), local_files_only=True)
    dev_name = str(resolve_device(device))
    dev = read_jsonl(data / "dev.jsonl")
    model, history = _fit(
        encoder, tokenizer, source.dim, seen, dev, list(meta["labels"]), cfg, dev_name, progress, prefix
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model.to("cpu"), cfg, tmp, meta["base"])
        fold = FinetunedTextEncoder(spec_entry(tmp, "oof-fold"), Path(tmp), dev_name, use_disk_cache=False)
        rows = fold.conversation_vectors(held, future_known=True)
    out = {}
    for conv, row in zip(held, rows, strict=True):
        vecs = np.full((len(row), source.dim), np.nan, np.float32)
        for i, v in enumerate(row):
            if v is not None:
                vecs[i] = v
        out[conv.id] = vecs.astype(np.float16)
    best = _best(history)
    return out, {
        "train_conversations": len(seen),
        "held_conversations": len(held),
        "best_dev": best,
        "history": history,
    }
