"""Evaluation report: figures (PNG) and a Markdown ``report.md``.

Matplotlib runs with the non-interactive Agg backend: nothing here opens a window,
so it works on headless servers and in tests.

- :func:`plot_confusion`: row-normalised confusion matrix with counts.
- :func:`plot_missing_curve`: a score over missing rates 0.0 .. 0.7, one line per
  model (e.g. ours against ITEACH-Net's published numbers).
- :func:`plot_training_curve`: train loss and dev weighted F1 / accuracy per epoch.
- :func:`write_report`: ``report.md`` with tables and the figures next to it.

The ``metrics`` dict read by :func:`write_report` is a
:func:`models.metrics.classification_metrics` dict, optionally with
``"missing_rates"`` (rate -> such a dict), ``"data_file"`` (path of the evaluated
JSONL) and ``"history"`` (per-epoch dicts, see :func:`plot_training_curve`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from models.metrics import SUMMARY_KEYS, missing_rate_summary, sorted_rates

CONFUSION_PNG = "confusion.png"
MISSING_PNG = "missing_rates.png"
TRAINING_PNG = "training_curve.png"

METRIC_NAMES: dict[str, str] = {
    "accuracy": "Accuracy",
    "weighted_f1": "Weighted F1",
    "macro_f1": "Macro F1",
}

# History keys accepted by plot_training_curve, first match wins.
_LOSS_KEYS = ("train_loss", "loss")
_DEV_LOSS_KEYS = ("dev_loss", "val_loss")
_DEV_WF1_KEYS = ("dev_weighted_f1", "dev_wf1", "dev_f1", "val_weighted_f1")
_DEV_ACC_KEYS = ("dev_accuracy", "dev_acc", "val_accuracy")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion(
    cm: Sequence[Sequence[int]] | np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Heat map of a confusion matrix, saved as PNG; returns the path.

    Colours are row-normalised (share of each gold class, so rare classes stay
    readable); each cell shows the count and the row percentage. Rows are gold
    classes, columns predictions, in ``labels`` order.
    """
    counts = np.asarray(cm, dtype=float)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {n} labels")
    row_sums = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)

    side = max(4.5, 0.85 * n + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("share of gold class")
    fontsize = 9 if n <= 8 else 7
    for i in range(n):
        for j in range(n):
            colour = "white" if share[i, j] > 0.55 else "black"
            text = f"{int(counts[i, j])}\n{100 * share[i, j]:.0f}%"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    names = [str(label) for label in labels]
    ax.set_xticks(range(n), names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), [f"{name} ({int(total)})" for name, total in zip(names, row_sums[:, 0], strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold (support)")
    ax.set_title(title)
    return _save(fig, path)


def plot_missing_curve(
    curves: Mapping[str, Mapping[float | str, float]],
    path: str | Path,
    metric_name: str = "Weighted F1",
) -> Path:
    """Score against missing rate, one line per series (model), saved as PNG.

    Args:
        curves: series name -> {missing rate: score in percent}. Rates may be
            strings (as read back from JSON). The legend gives each series' average
            over its rates (the UME score).
        path: PNG to write.
        metric_name: y-axis label.
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    all_rates: set[float] = set()
    markers = "osD^vP*X"
    for k, (name, points) in enumerate(curves.items()):
        items = sorted_rates(points)
        if not items:
            continue
        xs = [rate for rate, _ in items]
        ys = [float(value) for _, value in items]
        all_rates.update(xs)
        ax.plot(xs, ys, marker=markers[k % len(markers)], linewidth=1.8, label=f"{name} (avg {np.mean(ys):.2f})")
    ticks = sorted(all_rates | {round(0.1 * i, 1) for i in range(8)})
    ax.set_xticks(ticks, [f"{t:.1f}" for t in ticks])
    ax.set_xlim(min(ticks) - 0.03, max(ticks) + 0.03)
    ax.set_xlabel("missing rate")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} under missing modalities")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def _series(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[float] | None:
    """Values of the first key in ``keys`` that some epoch has (NaN where absent)."""
    for key in keys:
        if any(row.get(key) is not None for row in history):
            return [float(row[key]) if row.get(key) is not None else float("nan") for row in history]
    return None


def plot_training_curve(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training curves in two panels sharing the epoch axis, saved as PNG.

    Args:
        history: one dict per epoch. Keys read: ``epoch`` (default: 1, 2, ...),
            ``train_loss`` (or ``loss``), optional ``dev_loss``, ``dev_weighted_f1``
            (or ``dev_wf1`` / ``dev_f1``) and ``dev_accuracy`` (or ``dev_acc``), scores
            in percent. The best epoch (highest dev weighted F1) is marked.
        path: PNG to write.
    """
    if not history:
        raise ValueError("history is empty")
    epochs = [float(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    loss = _series(history, _LOSS_KEYS)
    dev_loss = _series(history, _DEV_LOSS_KEYS)
    wf1 = _series(history, _DEV_WF1_KEYS)
    acc = _series(history, _DEV_ACC_KEYS)

    fig, (ax_loss, ax_score) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True)
    if loss is not None:
        ax_loss.plot(epochs, loss, marker=".", color="tab:red", label="train loss")
    if dev_loss is not None:
        ax_loss.plot(epochs, dev_loss, marker=".", color="tab:purple", linestyle="--", label="dev loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    if wf1 is not None:
        ax_score.plot(epochs, wf1, marker=".", color="tab:blue", label="dev weighted F1")
    if acc is not None:
        ax_score.plot(epochs, acc, marker=".", color="tab:green", label="dev accuracy")
    ax_score.set_ylabel("dev score (%)")
    ax_score.set_xlabel("epoch")
    ax_score.grid(True, alpha=0.3)

    if wf1 is not None and not np.all(np.isnan(wf1)):
        best = int(np.nanargmax(wf1))
        for ax in (ax_loss, ax_score):
            ax.axvline(epochs[best], color="grey", linestyle=":", linewidth=1.5)
        ax_score.plot([epochs[best]], [wf1[best]], marker="*", markersize=14, color="gold", markeredgecolor="black")
        ax_score.annotate(
            f"best epoch {epochs[best]:g}: {wf1[best]:.2f}",
            xy=(epochs[best], wf1[best]),
            xytext=(6, -14),
            textcoords="offset points",
            fontsize=9,
        )
    for ax in (ax_loss, ax_score):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
    ax_loss.set_title("Training curve")
    return _save(fig, path)


# --------------------------------------------------------------------------- report.md


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _labels_of(metrics: Mapping[str, Any]) -> list[str]:
    if metrics.get("labels"):
        return [str(name) for name in metrics["labels"]]
    return [str(name) for name in (metrics.get("per_class_f1") or metrics.get("support") or {})]


def _first(mapping: Mapping[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if mapping and mapping.get(key) not in (None, ""):
            return mapping[key]
    return None


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    manifest: Mapping[str, Any] | None = None,
    title: str = "Evaluation report",
    *,
    missing_metric: str = "weighted_f1",
    reference_curves: Mapping[str, Mapping[float | str, float]] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its figures (next to it); returns the report's path.

    Args:
        out_dir: folder to write (created if needed).
        metrics: a :func:`models.metrics.classification_metrics` dict. Optional keys:
            ``"missing_rates"`` (rate -> metrics dict; adds a per-rate table, the
            missing-rate curve and the UME average), ``"data_file"`` and ``"dataset"``
            (shown in the header), ``"history"`` (per-epoch dicts; adds the training
            curve).
        manifest: the bundle manifest, if any. Read: ``name`` (or ``bundle``),
            ``architecture`` (or ``arch`` / ``model``), ``dataset``, ``history``; its
            other top-level scalar entries are listed in a table.
        title: first heading of the report.
        missing_metric: metric key drawn in the missing-rate curve.
        reference_curves: extra series for the missing-rate curve, name -> {rate:
            score} (e.g. published ITEACH-Net numbers).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels_of(metrics)
    lines: list[str] = [f"# {title}", ""]

    header = [
        ("Bundle", _first(manifest, "name", "bundle")),
        ("Architecture", _first(manifest, "architecture", "arch", "model")),
        ("Dataset", _first(metrics, "dataset") or _first(manifest, "dataset")),
        ("Data file", _first(metrics, "data_file", "data")),
        ("Utterances", metrics.get("n")),
        ("Classes", ", ".join(labels) if labels else None),
    ]
    lines += [f"- **{key}:** {_cell(value)}" for key, value in header if value is not None]
    lines.append("")

    lines += ["## Metrics", ""]
    lines += _table(
        ["Metric", "Value (%)"],
        [(METRIC_NAMES[key], metrics.get(key)) for key in SUMMARY_KEYS if key in metrics],
    )

    per_class = metrics.get("per_class_f1") or {}
    support = metrics.get("support") or {}
    if labels and (per_class or support):
        lines += ["## Per-class F1", ""]
        lines += _table(["Class", "F1 (%)", "Support"], [(n, per_class.get(n), support.get(n)) for n in labels])

    cm = metrics.get("confusion_matrix")
    if cm is not None and labels:
        plot_confusion(cm, labels, out / CONFUSION_PNG, title=f"Confusion matrix ({metrics.get('n', '?')} utterances)")
        lines += ["## Confusion matrix", "", "Rows: gold class; columns: prediction; colour: share of the row.", ""]
        lines += [f"![Confusion matrix]({CONFUSION_PNG})", ""]

    per_rate = metrics.get("missing_rates")
    if per_rate:
        items = sorted_rates(per_rate)
        ume = missing_rate_summary(per_rate)
        lines += ["## Missing modalities (UME)", ""]
        lines += [
            "The same model tested with modalities dropped at each missing rate; the UME score "
            "(ITEACH-Net's Unified Model Evaluation) is the average over the rates.",
            "",
        ]
        rows: list[list[Any]] = [
            [f"{rate:.1f}", *(scores.get(k) for k in SUMMARY_KEYS), scores.get("n")] for rate, scores in items
        ]
        rows.append(["**UME average**", *(ume.get(k) for k in SUMMARY_KEYS), None])
        lines += _table(["Missing rate", *(f"{METRIC_NAMES[k]} (%)" for k in SUMMARY_KEYS), "n"], rows)
        rate_labels = labels or _labels_of(items[0][1])
        if rate_labels and any(scores.get("per_class_f1") for _, scores in items):
            lines += ["Per-class F1 (%) by missing rate:", ""]
            lines += _table(
                ["Missing rate", *rate_labels],
                [[f"{rate:.1f}", *((s.get("per_class_f1") or {}).get(n) for n in rate_labels)] for rate, s in items],
            )
        name = _first(manifest, "name", "bundle") or _first(manifest, "architecture", "arch") or "this model"
        curves: dict[str, Mapping[float | str, float]] = {
            str(name): {rate: scores[missing_metric] for rate, scores in items if missing_metric in scores}
        }
        curves.update(reference_curves or {})
        metric_label = METRIC_NAMES.get(missing_metric, missing_metric)
        plot_missing_curve(curves, out / MISSING_PNG, metric_name=f"{metric_label} (%)")
        lines += [f"![{metric_label} by missing rate]({MISSING_PNG})", ""]

    history = metrics.get("history") or (manifest or {}).get("history")
    if history:
        plot_training_curve(history, out / TRAINING_PNG)
        lines += ["## Training", "", f"![Training curve]({TRAINING_PNG})", ""]

    extra = {
        key: value
        for key, value in (manifest or {}).items()
        if isinstance(value, str | int | float | bool) and key not in {"name", "bundle", "architecture", "arch"}
    }
    if extra:
        lines += ["## Bundle manifest", ""]
        lines += _table(["Key", "Value"], [(key, str(value)) for key, value in sorted(extra.items())])

    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
