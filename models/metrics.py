"""Evaluation metrics of the project: accuracy, weighted / macro F1, UAR (macro recall), per-class F1, confusion.

Pure numpy / scikit-learn (no torch). All scores are percentages (0-100) rounded to
two decimals, as the papers report them. Weighted F1 (support-weighted over classes)
is the headline metric for MELD and IEMOCAP.

Missing-modality robustness follows the Unified Model Evaluation (UME) of ITEACH-Net:
one trained model is tested at several missing rates (0.0 .. 0.7) and the scores are
averaged over the rates (:func:`missing_rate_summary`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""Targets equal to this (padding, unlabelled utterances) are dropped before scoring."""

SUMMARY_KEYS: tuple[str, ...] = ("accuracy", "weighted_f1", "macro_f1")


def _pct(value: float) -> float:
    return round(float(value) * 100.0, 2)


def _to_indices(values: Any, labels: Sequence[str], what: str) -> np.ndarray:
    """Class indices from an array-like of ints or of label names."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "US" or arr.dtype == object:
        index = {name: i for i, name in enumerate(labels)}
        try:
            return np.array([index[str(v)] for v in arr], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"{what}: unknown label {err.args[0]!r}; labels are {list(labels)}") from None
    if arr.size and arr.dtype.kind == "f" and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{what}: expected class indices or label names, got non-integer floats")
    return arr.astype(np.int64)


def classification_metrics(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Scores of predictions against gold labels.

    Args:
        y_true: gold classes, class indices into ``labels`` or label names (any 1-d
            array-like, a CPU tensor included). Entries equal to :data:`IGNORE_INDEX`
            are dropped together with the matching prediction.
        y_pred: predicted classes, same length and encoding as ``y_true``.
        labels: class names in class-index order.

    Returns:
        ``{"accuracy", "weighted_f1", "macro_f1"}``: percentages rounded to 2 decimals;
        ``"uar"``: unweighted average recall (macro recall over all C classes, the speech-emotion
        headline metric); ``"per_class_f1"``, ``"per_class_recall"``: ``{label: percent}``;
        ``"support"``: ``{label: gold count}``;
        ``"confusion_matrix"``: C x C list of lists of counts, rows = gold, columns =
        predicted, in ``labels`` order; ``"n"``: number of scored utterances;
        ``"labels"``: the label names.

    Every class of ``labels`` is scored even when absent from the gold labels or the
    predictions (F1 0 where undefined, ``zero_division=0``); the macro F1 therefore
    averages over all C classes.
    """
    labels = [str(name) for name in labels]
    n_classes = len(labels)
    if n_classes == 0:
        raise ValueError("labels is empty")
    true = _to_indices(y_true, labels, "y_true")
    pred = _to_indices(y_pred, labels, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} entries but y_pred has {pred.size}")
    keep = true != IGNORE_INDEX
    true, pred = true[keep], pred[keep]
    if true.size == 0:
        raise ValueError("no labelled utterances to score")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise ValueError(f"{name} has class index {int(arr[bad][0])} outside [0, {n_classes})")

    class_ids = list(range(n_classes))
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score  # ~100 MB: when used

    per_class = f1_score(true, pred, labels=class_ids, average=None, zero_division=0)
    recall = recall_score(true, pred, labels=class_ids, average=None, zero_division=0)
    cm = confusion_matrix(true, pred, labels=class_ids)
    support = np.bincount(true, minlength=n_classes)
    return {
        "accuracy": _pct(accuracy_score(true, pred)),
        "weighted_f1": _pct(f1_score(true, pred, labels=class_ids, average="weighted", zero_division=0)),
        "macro_f1": _pct(f1_score(true, pred, labels=class_ids, average="macro", zero_division=0)),
        "uar": _pct(float(np.mean(recall))),
        "per_class_f1": {name: _pct(value) for name, value in zip(labels, per_class, strict=True)},
        "per_class_recall": {name: _pct(value) for name, value in zip(labels, recall, strict=True)},
        "support": {name: int(count) for name, count in zip(labels, support, strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
        "n": int(true.size),
        "labels": labels,
    }


def rate_key(rate: float | str) -> float:
    """A missing rate as a float rounded to 4 decimals (JSON turns dict keys into strings)."""
    return round(float(rate), 4)


def sorted_rates(per_rate: Mapping[Any, Any]) -> list[tuple[float, Any]]:
    """``(rate, value)`` pairs of a rate-keyed mapping, rates as floats, ascending."""
    return sorted(((rate_key(rate), value) for rate, value in per_rate.items()), key=lambda item: item[0])


def missing_rate_summary(per_rate: Mapping[float | str, Mapping[str, Any]]) -> dict[str, Any]:
    """UME average (ITEACH-Net): mean accuracy / weighted F1 / macro F1 over missing rates.

    Args:
        per_rate: missing rate (float, or its string form as read back from JSON) ->
            a :func:`classification_metrics` dict (only the summary keys are read).

    Returns:
        ``{"accuracy", "weighted_f1", "macro_f1"}``: unweighted means over the rates,
        rounded to 2 decimals; ``"rates"``: the rates, ascending; ``"n_rates"``.
        A summary key missing from some rate is averaged over the rates that have it
        and left out when no rate has it.
    """
    items = sorted_rates(per_rate)
    if not items:
        raise ValueError("per_rate is empty")
    summary: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [float(scores[key]) for _, scores in items if scores.get(key) is not None]
        if values:
            summary[key] = round(float(np.mean(values)), 2)
    summary["rates"] = [rate for rate, _ in items]
    summary["n_rates"] = len(items)
    return summary
