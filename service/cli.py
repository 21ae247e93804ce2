"""The ``merc`` command line: train, evaluate, import-meld, serve, worker, extract, predict."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

# models.bundle.BundleError and models.data.DataError subclass ValueError; importing them here would load
# torch in every command, `merc serve` included (whose API process must not map libtorch: issue 12)
BundleError = DataError = ValueError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal emotion recognition in conversations.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _train_conf(config: Path | None, set_: list[str] | None, flags: dict) -> dict:
    """``merc train``'s sections (model, train, finetune): the YAML, then ``--set``, then the flags given."""
    from service.offline.training import load_yaml_config, parse_overrides

    conf = load_yaml_config(config)
    for section, values in parse_overrides(set_ or []).items():
        conf[section].update(values)
    conf["train"].update({k: v for k, v in flags.items() if v is not None})
    return conf


@app.command()
def train(
    arch: Annotated[str, typer.Argument(help="sdt, summer, dmd or iteach")],
    data: Annotated[
        list[Path],
        typer.Option(
            help="dataset folder: dataset.json, train.jsonl, dev.jsonl; repeat to train on several at once "
            "(the first one's labels; see --label-map, --data-modalities)"
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="bundle folder [weights/ARCH-DATASET]")] = None,
    modalities: Annotated[str | None, typer.Option(help="e.g. text,audio,visual [inline ones, else text]")] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(
            help="minilm-l6-v2, mpnet-base-v2, a HF id or path (frozen); finetune:BASE fine-tunes BASE with context "
            "windows first (options: --set finetune.NAME=V, e.g. past, future, epochs, lr); or a fine-tuned "
            "extractor folder from merc finetune-text"
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with 'model:' and 'train:' sections")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="model.NAME=V, train.NAME=V or finetune.NAME=V (repeatable)")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    missing: Annotated[str | None, typer.Option(help="none, fixed:0.3, random[:0.7], progressive[:0.1:10]")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="weights dtype: float16 or float32")] = "float16",
    speaker_norm: Annotated[
        str | None, typer.Option(help="modalities z-normalised per speaker in each conversation, e.g. audio")
    ] = None,
    norm_shrink: Annotated[
        float, typer.Option(help="speaker-norm: pseudo-utterances of training statistics (few-utterance speakers)")
    ] = 4.0,
    label_map: Annotated[
        str | None,
        typer.Option(help="OLD=NEW,...: other datasets' labels onto the first one's; OLD= drops a label"),
    ] = None,
    data_modalities: Annotated[
        list[str] | None,
        typer.Option(help="DATASET=MODALITY[,MODALITY]: only these of that dataset, e.g. ravdess8=audio (repeatable)"),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train an architecture on one or several dataset folders and write a bundle."""
    from service.offline.multi_data import parse_data_modalities, parse_label_map
    from service.offline.training import train_bundle

    try:
        flags = dict(seed=seed, device=device, missing=missing, epochs=epochs, lr=lr, batch_size=batch_size)
        conf = _train_conf(config, set_, {**flags, "patience": patience})
        out = out or Path("weights") / f"{arch}-{data[0].name}"
        manifest = train_bundle(
            arch,
            data,
            out,
            modalities=_csv(modalities),
            text_encoder=text_encoder,
            model_overrides=conf["model"],
            train_overrides=conf["train"],
            dtype=dtype,
            progress=not quiet,
            command="merc " + shlex.join(sys.argv[1:]),
            speaker_norm=_csv(speaker_norm),
            norm_shrink=norm_shrink,
            finetune_overrides=conf["finetune"],
            label_map=parse_label_map(label_map),
            data_modalities=parse_data_modalities(data_modalities),
        )
    except (DataError, BundleError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"bundle": str(out), "dev_metrics": manifest["dev_metrics"]}))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="bundle folder (manifest.json, model.safetensors)")],
    data: Annotated[Path, typer.Option(help="labelled conversations, canonical JSONL")],
    out: Annotated[Path, typer.Option(help="folder for metrics.json, report.md and plots")] = Path("eval"),
    missing_rates: Annotated[str | None, typer.Option(help="e.g. 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option(help="seed of the missing-modality masks")] = 0,
    drop: Annotated[str | None, typer.Option(help="modalities removed from every utterance, e.g. text")] = None,
    label_map: Annotated[
        str | None, typer.Option(help="OLD=NEW,...: the file's labels onto the bundle's; OLD= leaves them out")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Evaluate a bundle on a labelled file; the metrics JSON is the last line of stdout."""
    from service.offline.evaluation import evaluate_bundle
    from service.offline.multi_data import parse_label_map

    try:
        rates = [float(r) for r in _csv(missing_rates) or []]
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError("--missing-rates: each rate must be in [0, 1)")
        mapping = parse_label_map(label_map)
        metrics = evaluate_bundle(bundle, data, out, rates, device, seed, not quiet, _csv(drop) or [], mapping)
    except (DataError, BundleError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"report: {out / 'report.md'}")
    typer.echo(json.dumps(metrics))


@app.command()
def cv(
    arch: Annotated[str, typer.Argument(help="sdt, summer, dmd or iteach")],
    data: Annotated[Path, typer.Option(help="dataset folder: dataset.json, train.jsonl, dev.jsonl")],
    work: Annotated[Path, typer.Option(help="folder for the runs, cv.json and cv.md (reused when unchanged)")],
    folds: Annotated[
        str, typer.Option(help="N (conversations shuffled), a key naming the folds (media.session), 0: own split only")
    ] = "5",
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds")] = "0",
    only: Annotated[
        str | None, typer.Option(help="train only these folds (comma-separated); others are reused")
    ] = None,
    modalities: Annotated[str | None, typer.Option(help="as merc train")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="as merc train; finetune:BASE is refit per fold")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with 'model:' and 'train:' sections")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="as merc train (repeatable)")] = None,
    device: Annotated[str | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option()] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Score a training recipe by cross-validation over the training conversations (mean +- std)."""
    from service.offline.crossval import cross_validate
    from service.offline.evaluation import evaluate_bundle
    from service.offline.training import train_bundle

    try:
        flags = dict(device=device, epochs=epochs, lr=lr, batch_size=batch_size, patience=patience)
        conf = _train_conf(config, set_, flags)
        seed_list = [int(s) for s in _csv(seeds) or ["0"]]
        recipe = {"modalities": modalities, "text_encoder": text_encoder, **conf}

        def fit_fold(fold_data: Path, bundle: Path, seed: int) -> dict:
            command = "merc " + shlex.join(sys.argv[1:]) + f" (fold data {fold_data}, seed {seed})"
            return train_bundle(
                arch, fold_data, bundle, modalities=_csv(modalities), text_encoder=text_encoder,
                model_overrides=conf["model"], train_overrides={**conf["train"], "seed": seed},
                progress=not quiet, command=command, finetune_overrides=dict(conf["finetune"]),
            )

        def score_fold(bundle: Path, file: Path, out: Path) -> dict:
            return evaluate_bundle(bundle, file, out, progress=False)

        chosen = [int(k) for k in _csv(only)] if only else None
        result = cross_validate(arch, data, work, folds, seed_list, fit_fold, score_fold, recipe, chosen)
    except (DataError, BundleError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo((work / "cv.md").read_text())
    typer.echo(json.dumps(result["summary"]))


@app.command("finetune-text")
def finetune_text_cmd(
    data: Annotated[Path, typer.Option(help="dataset folder: dataset.json, train.jsonl, dev.jsonl")],
    base: Annotated[str, typer.Option(help="minilm-l6-v2, mpnet-base-v2, a HF id or a local path")] = "minilm-l6-v2",
    out: Annotated[Path | None, typer.Option(help="extractor folder [weights/text/DATASET-BASE]")] = None,
    past: Annotated[int, typer.Option(help="previous turns in each utterance's input")] = 2,
    future: Annotated[int, typer.Option(help="following turns (only where the whole conversation is known)")] = 0,
    speaker: Annotated[bool, typer.Option(help="prefix turns with 'Speaker: '")] = True,
    max_length: Annotated[int, typer.Option(help="tokens per input (the context is truncated first)")] = 96,
    mode: Annotated[
        str, typer.Option(help="pairs (an input per utterance) or conversation (each turn encoded once, in chunks)")
    ] = "pairs",
    chunk: Annotated[int, typer.Option(help="conversation mode: output turns per chunk")] = 4,
    turn_tokens: Annotated[int, typer.Option(help="conversation mode: tokens per turn")] = 48,
    windowed: Annotated[
        bool, typer.Option(help="conversation mode: a turn attends only to itself and its --past turns before it")
    ] = False,
    pooling: Annotated[str, typer.Option(help="target-mean or cls")] = "target-mean",
    adapter: Annotated[str, typer.Option(help="lora (small, over the packaged weights) or full")] = "lora",
    lora_r: Annotated[int, typer.Option()] = 16,
    lora_layers: Annotated[int | None, typer.Option(help="adapters on the top N layers only [all]")] = None,
    cache_lower: Annotated[
        bool, typer.Option(help="with --lora-layers: run the frozen lower layers once, train over their cached states")
    ] = False,
    cache_alignments: Annotated[
        int, typer.Option(help="conversation mode with --cache-lower: chunk alignments cached, one drawn per epoch")
    ] = 2,
    init: Annotated[
        Path | None, typer.Option(help="warm start from this extractor's adapter and head (same base, LoRA)")
    ] = None,
    distill: Annotated[
        Path | None,
        typer.Option(
            help="conversation mode: also match this (pair-mode) extractor's vectors, so the student can "
            "serve a fusion model trained on them (merc rebase-text)"
        ),
    ] = None,
    distill_weight: Annotated[float, typer.Option(help="weight of the vector-matching loss")] = 1.0,
    epochs: Annotated[int, typer.Option()] = 3,
    lr: Annotated[float, typer.Option(help="encoder (adapter) learning rate")] = 5e-4,
    head_lr: Annotated[float, typer.Option()] = 2e-3,
    batch_size: Annotated[int, typer.Option()] = 16,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    patience: Annotated[int, typer.Option(help="dev evaluations without improvement before stopping")] = 2,
    evals_per_epoch: Annotated[int, typer.Option()] = 1,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many optimiser steps")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda (mixed precision on CUDA)")] = "auto",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="resumable checkpoints [OUT/checkpoint]")] = None,
    checkpoint_every: Annotated[
        float, typer.Option(help="seconds between checkpoints (also after each evaluation); 0: every step")
    ] = 300.0,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run checkpointed in DIR (same options and data)")
    ] = None,
    stop_after: Annotated[
        float | None, typer.Option(help="stop after this many seconds of training, checkpoint written (exit 3)")
    ] = None,
    keep_checkpoint: Annotated[bool, typer.Option(help="keep the checkpoint once the extractor is saved")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Fine-tune a text encoder (LoRA) with context windows on a dataset folder: a reusable text extractor.

    Resumable: a checkpoint every --checkpoint-every seconds; after an interruption (or --stop-after) the same
    command with --resume DIR continues to the weights an uninterrupted run ends with."""
    from models.text_checkpoint import Checkpointing, TrainingStopped
    from models.text_finetune import FineTuneConfig
    from service.offline.text_finetuning import finetune_text, window_from_options

    try:
        cfg = FineTuneConfig(
            window=window_from_options(past, future, speaker, max_length, mode, chunk, turn_tokens, windowed),
            pooling=pooling,
            adapter=adapter,
            lora_r=lora_r,
            lora_alpha=2 * lora_r,
            lora_layers=lora_layers,
            cache_lower=cache_lower,
            cache_alignments=cache_alignments,
            init=str(init) if init else None,
            distill=str(distill) if distill else None,
            distill_weight=distill_weight,
            lr=lr,
            head_lr=head_lr,
            epochs=epochs,
            batch_size=batch_size,
            grad_accum=grad_accum,
            patience=patience,
            evals_per_epoch=evals_per_epoch,
            max_steps=max_steps,
            seed=seed,
        )
        out = out or Path("weights") / "text" / f"{data.name}-{base.replace('/', '_')}"
        if resume and checkpoint_dir and resume.resolve() != checkpoint_dir.resolve():
            raise ValueError("--resume DIR continues writing to DIR: leave out --checkpoint-dir or give the same")
        command = "merc " + shlex.join(sys.argv[1:])
        where = resume or checkpoint_dir or out / "checkpoint"
        policy = Checkpointing(where, checkpoint_every, resume is not None, stop_after, note={"command": command})
        meta = finetune_text(
            data, base, out, cfg, device, not quiet, command, checkpoint=policy, keep_checkpoint=keep_checkpoint
        )
    except TrainingStopped as e:
        typer.echo(json.dumps({"stopped": str(e), "checkpoint": str(e.directory), "step": e.step}))
        raise typer.Exit(3) from None
    except (DataError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"extractor": str(out), "best_dev": meta["best_dev"], "sha256": meta["sha256"]}))


@app.command("rebase-text")
def rebase_text_cmd(
    bundle: Annotated[Path, typer.Option(help="a bundle whose text encoder is a fine-tuned extractor")],
    extractor: Annotated[Path, typer.Option(help="an extractor distilled from it (merc finetune-text --distill)")],
    out: Annotated[Path, typer.Option(help="the new bundle folder")],
    data: Annotated[Path, typer.Option(help="the dataset folder (its dev.jsonl measures the new bundle)")],
) -> None:
    """A copy of BUNDLE that reads the distilled EXTRACTOR's vectors (e.g. the faster conversation mode)."""
    from service.offline.training import rebase_text_bundle

    try:
        manifest = rebase_text_bundle(bundle, extractor, out, data, "merc " + shlex.join(sys.argv[1:]))
    except (DataError, ValueError, OSError) as e:
        _fail(str(e))
    before = manifest["rebased"]["teacher_dev_metrics"] or {}
    typer.echo(
        json.dumps(
            {
                "bundle": str(out),
                "dev_weighted_f1": manifest["dev_metrics"]["weighted_f1"],
                "teacher_dev_weighted_f1": before.get("weighted_f1"),
            }
        )
    )


@app.command()
def ensemble(
    members: Annotated[list[Path], typer.Option(help="member bundle folders (repeat: --members A --members B)")],
    out: Annotated[Path, typer.Option(help="the ensemble bundle folder, e.g. weights/NAME")],
    data: Annotated[Path, typer.Option(help="the dataset folder (its dev.jsonl scores the ensemble and members)")],
    link: Annotated[
        bool, typer.Option(help="name the members by relative path instead of copying them into OUT/members/")
    ] = False,
    device: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """An ensemble bundle: the mean of the members' per-utterance distributions (same labels; each member
    reads its own text features), scored on dev beside each member."""
    from service.offline.ensemble import build_ensemble

    try:
        manifest = build_ensemble(members, out, data, device, link, not quiet, "merc " + shlex.join(sys.argv[1:]))
    except (DataError, BundleError, ValueError, OSError) as e:
        _fail(str(e))
    figures = {m["name"]: m["dev_metrics"]["weighted_f1"] for m in manifest["members"]}
    dev = manifest["dev_metrics"]["weighted_f1"]
    typer.echo(json.dumps({"bundle": str(out), "dev_weighted_f1": dev, "members_dev_weighted_f1": figures}))


@app.command("oof-text-features")
def oof_text_features_cmd(
    extractor: Annotated[Path, typer.Option(help="a fine-tuned text extractor folder (merc finetune-text)")],
    data: Annotated[Path, typer.Option(help="the dataset folder it was fine-tuned on")],
    folds: Annotated[int, typer.Option(help="K: fine-tunes on K-1 folds each")] = 2,
    epochs: Annotated[int | None, typer.Option(help="epochs per fold [the extractor's config]")] = None,
    lr: Annotated[float | None, typer.Option(help="LoRA learning rate per fold [the extractor's config]")] = None,
    head_lr: Annotated[float | None, typer.Option(help="head learning rate per fold [the extractor's config]")] = None,
    fold: Annotated[int | None, typer.Option(help="fit only this fold (run folds in parallel processes)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Out-of-fold train features of a fine-tuned extractor (train fusion models with --set finetune.oof=true).

    Fold models start from the base encoder (a warm start saw every train label); give the cold recipe
    with --lr/--head-lr/--epochs when the extractor was warm-started. Folds already written with the same
    recipe are reused, so `--fold 0` and `--fold 1` in two processes, then a run without --fold, merge."""
    from service.offline.text_finetuning import oof_features

    if folds < 2:
        _fail("--folds must be >= 2")
    if fold is not None and not 0 <= fold < folds:
        _fail(f"--fold must be in 0..{folds - 1}")
    overrides = {k: v for k, v in {"lr": lr, "head_lr": head_lr}.items() if v is not None}
    try:
        path = oof_features(extractor, data, folds, device, not quiet, epochs, fold, overrides)
    except (DataError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"oof_features": str(path)}))


@app.command("import-meld")
def import_meld(
    csv_dir: Annotated[Path, typer.Argument(help="folder with MELD's train/dev/test_sent_emo.csv")],
    out: Annotated[Path, typer.Argument(help="dataset folder to write (JSONL + dataset.json)")],
) -> None:
    """Convert MELD's native CSVs into a canonical dataset folder."""
    from models.importers import import_meld_dir

    try:
        written = import_meld_dir(csv_dir, out)
    except (ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps({k: str(v) for k, v in written.items()}))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: Annotated[Path | None, typer.Option(help="job store and uploads [$MERC_DATA_DIR or ./merc-data]")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the REST API with an in-process worker and a SQLite job store (settings: MERC_* variables)."""
    import uvicorn

    from service.api import create_app
    from service.settings import Settings

    try:
        settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
        application = create_app(settings)
    except (ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"merc: data in {settings.data_dir.resolve()}, default model {settings.default_model}", err=True)
    log_config = uvicorn.config.LOGGING_CONFIG
    if os.environ.get("MERC_LOG_FORMAT"):  # one root handler: JSON lines (or text), uvicorn's too
        from service.logging import setup_logging

        setup_logging(level=log_level)
        log_config = None
    from service.api.slow_clients import timed_protocol

    http = timed_protocol(settings.header_timeout_s, settings.body_timeout_s, settings.body_min_rate)  # slow clients
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        log_config=log_config,
        http=http,
    )


@app.command()
def extract(
    data: Annotated[Path, typer.Option(help="dataset folder: dataset.json and *.jsonl (canonical format)")],
    media: Annotated[Path, typer.Option(help="media root: {conversation id}.mp4 or {utterance id}.mp4 (MELD)")],
    out: Annotated[Path, typer.Option(help="dataset folder to write (JSONL with features + dataset.json)")],
    modalities: Annotated[str, typer.Option(help="media modalities to extract")] = "audio,visual",
    audio: Annotated[str, typer.Option(help="compare2016 (6373-d) or egemaps-v02 (88-d)")] = "compare2016",
    visual: Annotated[str, typer.Option(help="mtcnn-pyemotion (768-d) or mtcnn-r3d18 (512-d)")] = "mtcnn-pyemotion",
    frame_every: Annotated[int, typer.Option(help="sample one frame in N inside each utterance")] = 10,
    face: Annotated[str, typer.Option(help="confident or speaker (active speaker among several faces)")] = "confident",
    r3d_weights: Annotated[Path | None, typer.Option(help="r3d_18 state dict for mtcnn-r3d18")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    bundle: Annotated[
        Path | None, typer.Option(help="extract exactly the media features this bundle's feature spec names")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Extract audio/visual features from media for a dataset; resumable; bad files are logged and skipped.

    With --bundle the extractors, versions and options come from the bundle's manifest (the way to
    evaluate a bundle on new media: extract, then `merc evaluate --bundle B --data OUT/dev.jsonl`).
    """
    from service.features.registry import make_spec
    from service.offline.extraction import bundle_media_spec, extract_dataset

    try:
        if bundle is not None:
            spec = bundle_media_spec(bundle)
        else:
            chosen = _csv(modalities) or []
            unknown = set(chosen) - {"audio", "visual"}
            if unknown:
                raise ValueError(f"--modalities: {sorted(unknown)} are not media modalities (audio, visual)")
            opts = {"frame_every": frame_every, "face": face, "weights": str(r3d_weights) if r3d_weights else None}
            spec = {m: make_spec(m, audio if m == "audio" else visual, None if m == "audio" else opts) for m in chosen}
        summary = extract_dataset(data, media, out, spec, device, not quiet)
    except (DataError, ValueError, OSError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary))


def _read_transcript(path: Path):
    from models.data import DataError, parse_conversation

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(raw, list):
        raw = {"utterances": raw}
    return parse_conversation(raw, path.name)


@app.command()
def predict(
    file: Annotated[Path, typer.Argument(help="a video or audio file, or a transcript .json (text only)")],
    transcript: Annotated[
        Path | None,
        typer.Option(help="JSON conversation (utterances with start/end); omitted: speech recognition makes one"),
    ] = None,
    bundle: Annotated[
        str | None,
        typer.Option(
            help="bundle name in weights/ or a bundle folder [media: MERC_DEFAULT_MEDIA_MODEL, else MERC_DEFAULT_MODEL]"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
) -> None:
    """Predict one local conversation; per-utterance distributions as JSON on stdout.

    Media without --transcript is transcribed offline (Whisper tiny.en, speakers clustered); the
    result's "transcript" says so and how confident it is. A supplied transcript always wins.
    Without --bundle, media goes to the media default bundle (text and audio), a transcript alone to the default.
    """
    from service.api.catalogue import default_bundle
    from service.inference.pipeline import run_conversation
    from service.inference.predictor import Predictor
    from service.offline.extraction import media_input
    from service.settings import get_settings

    try:
        if file.suffix.lower() in (".json", ".jsonl"):
            conv, media = _read_transcript(file), None
        else:
            conv = _read_transcript(transcript) if transcript else None  # None: transcribe the media
            media = media_input(file)
        s = get_settings()
        bundle = bundle or default_bundle(s.default_model, s.default_media_model, s.weights_dir, media is not None)
        result = run_conversation(Predictor(bundle, device, s.weights_dir), conv, media, device, conv_id=file.stem)
    except (DataError, BundleError, ValueError, OSError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result, indent=2))


@app.command()
def worker(
    name: Annotated[str | None, typer.Option("--name", "-n", help="Celery node name, %h = host [merc@%h]")] = None,
    queues: Annotated[str, typer.Option(help="queues to take jobs from")] = "merc",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run a GPU worker for the API's Redis queue (MERC_QUEUE): Celery, one process per GPU.

    Solo pool, one job at a time, acknowledged after it ran; models load once the worker is up.
    """
    from service.jobs.celery_app import app as celery_app
    from service.jobs.celery_app import get_queue_settings

    if not get_queue_settings().queue:
        _fail("set MERC_QUEUE=redis://host:6379/0, the Redis the API queues jobs in")
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1"]
    celery_app.worker_main([*argv, "-Q", queues, "-n", name or "merc@%h", "--loglevel", log_level.upper()])


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
