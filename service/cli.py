"""The ``merc`` command line: train, evaluate (serve, worker, extract, predict come later)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from models.bundle import BundleError
from models.data import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal emotion recognition in conversations.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def train(
    arch: Annotated[str, typer.Argument(help="sdt, summer, dmd or iteach")],
    data: Annotated[Path, typer.Option(help="dataset folder: dataset.json, train.jsonl, dev.jsonl")],
    out: Annotated[Path | None, typer.Option(help="bundle folder [weights/ARCH-DATASET]")] = None,
    modalities: Annotated[str | None, typer.Option(help="e.g. text,audio,visual [inline ones, else text]")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="minilm-l6-v2, mpnet-base-v2, a HF id or path")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with 'model:' and 'train:' sections")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="model.NAME=V or train.NAME=V (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    missing: Annotated[str | None, typer.Option(help="none, fixed:0.3, random[:0.7], progressive[:0.1:10]")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="weights dtype: float16 or float32")] = "float16",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train an architecture on a dataset folder and write a bundle."""
    from service.training import load_yaml_config, parse_overrides, train_bundle

    try:
        conf = load_yaml_config(config)
        for section, values in parse_overrides(set_ or []).items():
            conf[section].update(values)
        flags = dict(seed=seed, device=device, missing=missing, epochs=epochs, lr=lr, batch_size=batch_size)
        flags["patience"] = patience
        conf["train"].update({k: v for k, v in flags.items() if v is not None})
        out = out or Path("weights") / f"{arch}-{data.name}"
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
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Evaluate a bundle on a labelled file; the metrics JSON is the last line of stdout."""
    from service.evaluation import evaluate_bundle

    try:
        rates = [float(r) for r in _csv(missing_rates) or []]
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError("--missing-rates: each rate must be in [0, 1)")
        metrics = evaluate_bundle(bundle, data, out, rates, device, seed, not quiet, _csv(drop) or [])
    except (DataError, BundleError, ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(f"report: {out / 'report.md'}")
    typer.echo(json.dumps(metrics))


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
