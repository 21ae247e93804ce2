"""`merc cv`: a training recipe scored by cross-validation over a dataset's training conversations.

One small dev split can choose a recipe that the test split disagrees with (IEMOCAP's 12 dev dialogues
did: docs/results.md). Here the training conversations are cut into folds (IEMOCAP: its four training
sessions, ``--folds media.session``; MELD or an unseen dataset: ``--folds 5``, conversations shuffled
with a fixed seed), and for every fold and seed the recipe (``merc train``'s arguments, the text
fine-tune of ``--text-encoder finetune:BASE`` included, so the extractor never sees the held-out labels)
is trained on the other folds, its checkpoint chosen on the dataset's own dev split as usual, and
scored on the held-out fold. ``--folds 0`` keeps the dataset's own split: seeds only (a bundle's dev
figure as mean +- std over seeds).

Each (fold, seed) run is a folder under ``--work`` with its data files, bundle, evaluation and
``run.json``; a run whose recipe, data and fold are unchanged is reused, so folds can be trained in
several processes (``--only K``) and merged by a last call. Nothing here is copied into the repository:
the fold files are derived from the dataset (IEMOCAP's licence forbids redistribution).
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.data import DataError

METRICS = ("weighted_f1", "accuracy", "macro_f1", "uar")


def _key_value(record: dict[str, Any], key: str) -> Any:
    """``record``'s value at a dotted ``key`` (e.g. ``media.session``), or a DataError naming it."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"--folds {key}: conversation {record.get('id')!r} has no {key!r}")
        value = value[part]
    return value


def fold_assignment(records: Sequence[dict[str, Any]], folds: str, seed: int = 0) -> list[int]:
    """The fold of each training conversation: ``folds`` an integer N >= 2 (conversations shuffled with
    ``seed``, dealt round-robin) or a dotted key whose values name the folds (sorted)."""
    if folds.isdigit():
        n = int(folds)
        if n < 2 or n > len(records):
            raise ValueError(f"--folds {n}: need 2 <= folds <= {len(records)} conversations")
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        out = [0] * len(records)
        for rank, i in enumerate(order):
            out[i] = rank % n
        return out
    values = [_key_value(r, folds) for r in records]
    names = sorted(set(values), key=str)
    if len(names) < 2:
        raise ValueError(f"--folds {folds}: the training conversations have {len(names)} distinct value(s)")
    return [names.index(v) for v in values]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def write_fold_data(data_dir: Path, folder: Path, assignment: Sequence[int] | None, fold: int) -> Path:
    """A dataset folder for one fold: train = the other folds, dev = the dataset's dev, ``heldout.jsonl``
    = this fold (``assignment`` None: the dataset's own train and dev, no held-out file)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = _lines(data_dir / "train.jsonl")
    info = json.loads((data_dir / "dataset.json").read_text())
    if assignment is not None:
        held = [line for line, f in zip(train, assignment, strict=True) if f == fold]
        train = [line for line, f in zip(train, assignment, strict=True) if f != fold]
        (folder / "heldout.jsonl").write_text("\n".join(held) + "\n")
        info["cross_validation"] = {"fold": fold, "source": str(data_dir)}
    (folder / "train.jsonl").write_text("\n".join(train) + "\n")
    (folder / "dev.jsonl").write_text((data_dir / "dev.jsonl").read_text())
    (folder / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def recipe_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON (what a reused run must match)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (over runs) of the held-out and dev metrics."""
    out: dict[str, Any] = {"runs": len(runs)}
    for split in ("heldout", "dev"):
        for m in METRICS:
            xs = [r[split][m] for r in runs if r.get(split) and m in r[split]]
            if xs:
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                out[f"{split}_{m}"] = {"mean": round(statistics.fmean(xs), 2), "std": round(sd, 2), "n": len(xs)}
    return out


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in (*METRICS, "n", "per_class_f1") if k in metrics}


def cross_validate(
    arch: str,
    data_dir: Path,
    work: Path,
    folds: str,
    seeds: Sequence[int],
    train: Callable[[Path, Path, int], dict[str, Any]],
    evaluate: Callable[[Path, Path, Path], dict[str, Any]],
    recipe: dict[str, Any],
    only: Sequence[int] | None = None,
    fold_seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run (or reuse) every (fold, seed) of ``recipe`` and write ``work/cv.json`` and ``work/cv.md``.

    ``train(fold data folder, bundle folder, seed)`` returns the manifest; ``evaluate(bundle, file,
    out folder)`` the metrics. ``only``: train these folds only (the summary covers every run present).
    """
    say = progress or (lambda _: None)
    records = [json.loads(line) for line in _lines(Path(data_dir) / "train.jsonl")]
    assignment = None if folds == "0" else fold_assignment(records, folds, fold_seed)
    n_folds = 1 if assignment is None else max(assignment) + 1
    data_hash = hashlib.sha256(
        b"".join((Path(data_dir) / f).read_bytes() for f in ("train.jsonl", "dev.jsonl"))
    ).hexdigest()
    key = recipe_hash({**recipe, "arch": arch, "folds": folds, "fold_seed": fold_seed, "data": data_hash})
    runs = []
    for fold in range(n_folds):
        for seed in seeds:
            run_dir = Path(work) / (f"fold{fold}-seed{seed}" if assignment else f"seed{seed}")
            record_file = run_dir / "run.json"
            earlier = json.loads(record_file.read_text()) if record_file.is_file() else {}
            if earlier.get("recipe_sha256") == key:
                runs.append(earlier)
                say(f"cv: fold {fold} seed {seed}: reused ({record_file})")
                continue
            if only is not None and fold not in only:
                continue
            say(f"cv: fold {fold + 1}/{n_folds} seed {seed}: training")
            fold_data = write_fold_data(Path(data_dir), run_dir / "data", assignment, fold)
            manifest = train(fold_data, run_dir / "bundle", seed)
            run = {"fold": fold, "seed": seed, "recipe_sha256": key, "dev": _brief(manifest["dev_metrics"])}
            if assignment is not None:
                held = evaluate(run_dir / "bundle", fold_data / "heldout.jsonl", run_dir / "eval")
                run["heldout"] = _brief(held)
            run["best_epochs"] = manifest.get("best_epochs")
            record_file.write_text(json.dumps(run, indent=2) + "\n")
            runs.append(run)
            say(f"cv: fold {fold} seed {seed}: {json.dumps({k: run[k] for k in ('dev', 'heldout') if k in run})}")
    result = {"arch": arch, "data": str(data_dir), "folds": folds, "seeds": list(seeds), "recipe": recipe}
    result.update(summary=summarise(runs), runs=runs)
    Path(work).mkdir(parents=True, exist_ok=True)
    (Path(work) / "cv.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(work) / "cv.md").write_text(cv_table(result))
    return result


def cv_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per run, then mean +- std."""
    rows = ["| fold | seed | held-out w-F1 | held-out acc | dev w-F1 | best epoch |", "|---|---|---:|---:|---:|---:|"]
    for r in sorted(result["runs"], key=lambda r: (r["fold"], r["seed"])):
        held = r.get("heldout", {})
        rows.append(
            f"| {r['fold']} | {r['seed']} | {held.get('weighted_f1', '-')} | {held.get('accuracy', '-')} "
            f"| {r['dev']['weighted_f1']} | {r.get('best_epochs')} |"
        )
    s = result["summary"]
    fmt = lambda k: f"{s[k]['mean']:.2f} +- {s[k]['std']:.2f}" if k in s else "-"  # noqa: E731
    rows.append(
        f"| mean +- std | | {fmt('heldout_weighted_f1')} | {fmt('heldout_accuracy')} | {fmt('dev_weighted_f1')} | |"
    )
    return f"# merc cv {result['arch']} on {result['data']} (folds: {result['folds']})\n\n" + "\n".join(rows) + "\n"
