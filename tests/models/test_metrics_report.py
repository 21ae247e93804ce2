"""Metrics against hand-computed cases; figures and report.md are written and linked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.metrics import IGNORE_INDEX, classification_metrics, missing_rate_summary
from models.report import (
    CONFUSION_PNG,
    MISSING_PNG,
    TRAINING_PNG,
    plot_confusion,
    plot_missing_curve,
    plot_training_curve,
    write_report,
)

LABELS = ["a", "b", "c"]
# a: tp 2, fp 1, fn 1 -> F1 2/3; b: tp 2, fp 1, fn 0 -> F1 0.8; c: never predicted -> F1 0.
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 1, 0]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_hand_computed_with_class_absent_from_predictions() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    assert m["accuracy"] == 66.67
    assert m["weighted_f1"] == 60.0  # (3 * 2/3 + 2 * 0.8 + 1 * 0) / 6
    assert m["macro_f1"] == 48.89  # (2/3 + 0.8 + 0) / 3
    assert m["per_class_f1"] == {"a": 66.67, "b": 80.0, "c": 0.0}
    assert m["support"] == {"a": 3, "b": 2, "c": 1}
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["n"] == 6
    assert m["labels"] == LABELS


def test_metrics_class_absent_everywhere_and_label_names() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, [*LABELS, "d"])
    assert m["weighted_f1"] == 60.0  # support 0: no weight
    assert m["macro_f1"] == 36.67  # averaged over all 4 classes
    assert m["per_class_f1"]["d"] == 0.0 and m["support"]["d"] == 0
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    by_name = classification_metrics([LABELS[i] for i in Y_TRUE], [LABELS[i] for i in Y_PRED], LABELS)
    assert by_name == classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), LABELS)


def test_metrics_perfect_and_ignore_index() -> None:
    m = classification_metrics([0, 1, IGNORE_INDEX, 2], [0, 1, 2, 2], LABELS)
    assert (m["accuracy"], m["weighted_f1"], m["macro_f1"], m["n"]) == (100.0, 100.0, 100.0, 3)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [([0, 1], [0], "entries"), ([0, 3], [0, 1], "outside"), ([IGNORE_INDEX], [0], "no labelled"), (["x"], ["a"], "x")],
)
def test_metrics_rejects_bad_input(y_true: list, y_pred: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, LABELS)


def test_missing_rate_summary_averages_over_rates() -> None:
    per_rate = {
        "0.5": {"accuracy": 70.0, "weighted_f1": 55.0, "macro_f1": 41.0},
        0.0: {"accuracy": 60.0, "weighted_f1": 50.0, "macro_f1": 40.0},
        0.7: {"accuracy": 50.0, "weighted_f1": 45.5, "macro_f1": 30.0},
    }
    s = missing_rate_summary(per_rate)
    assert s == {"accuracy": 60.0, "weighted_f1": 50.17, "macro_f1": 37.0, "rates": [0.0, 0.5, 0.7], "n_rates": 3}
    with pytest.raises(ValueError):
        missing_rate_summary({})


def test_plots_write_png(tmp_path: Path) -> None:
    cm = classification_metrics(Y_TRUE, Y_PRED, LABELS)["confusion_matrix"]
    assert _is_png(plot_confusion(cm, LABELS, tmp_path / "cm.png", "test"))
    curves = {"ours": {0.0: 60.0, 0.3: 55.0, 0.7: 48.0}, "ITEACH-Net": {"0.0": 62.0, "0.7": 50.0}}
    assert _is_png(plot_missing_curve(curves, tmp_path / "sub" / "missing.png", "Weighted F1"))
    history = [
        {"epoch": 1, "train_loss": 1.5, "dev_weighted_f1": 40.0, "dev_accuracy": 45.0},
        {"epoch": 2, "train_loss": 1.1, "dev_weighted_f1": 52.0, "dev_accuracy": 55.0},
        {"epoch": 3, "train_loss": 0.9, "dev_weighted_f1": 50.0, "dev_accuracy": 56.0},
    ]
    assert _is_png(plot_training_curve(history, tmp_path / "train.png"))
    with pytest.raises(ValueError):
        plot_confusion(cm, ["a", "b"], tmp_path / "bad.png")


def test_write_report_with_missing_rates(tmp_path: Path) -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    metrics["data_file"] = "data/meld7/dev.jsonl"
    metrics["missing_rates"] = {
        "0.0": classification_metrics(Y_TRUE, Y_PRED, LABELS),
        "0.5": classification_metrics(Y_TRUE, [0, 1, 1, 1, 0, 0], LABELS),
    }
    metrics["history"] = [{"epoch": 1, "train_loss": 1.0, "dev_weighted_f1": 50.0}]
    manifest = {"name": "iteach-meld7", "architecture": "iteach", "lr": 0.0005, "nested": {"skip": 1}}
    path = write_report(tmp_path / "out", metrics, manifest, title="Dev report")
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Dev report")
    for needle in [
        "**Bundle:** iteach-meld7",
        "**Architecture:** iteach",
        "**Data file:** data/meld7/dev.jsonl",
        "**Utterances:** 6",
        "| Weighted F1 | 60.00 |",
        "| Macro F1 | 48.89 |",
        "| a | 66.67 | 3 |",
        "| c | 0.00 | 1 |",
        f"![Confusion matrix]({CONFUSION_PNG})",
        "| 0.0 | 66.67 | 60.00 | 48.89 | 6 |",
        "| 0.5 |",
        "UME average",
        f"({MISSING_PNG})",
        f"({TRAINING_PNG})",
        "| lr | 0.0005 |",
    ]:
        assert needle in text, needle
    assert "nested" not in text
    for name in (CONFUSION_PNG, MISSING_PNG, TRAINING_PNG):
        assert _is_png(tmp_path / "out" / name)


def test_write_report_minimal(tmp_path: Path) -> None:
    metrics = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    text = write_report(tmp_path, metrics, None).read_text(encoding="utf-8")
    assert "## Per-class F1" in text and CONFUSION_PNG in text
    assert MISSING_PNG not in text and "Bundle" not in text
    assert not (tmp_path / MISSING_PNG).exists()
