"""Train the voice reading (service/features/voice_reading.py) on a dataset ``merc extract`` made.

    .venv/bin/merc extract --data ../shared/data/emodb7 --media ../shared/media/emodb7 \\
        --out /tmp/emodb7-compare --modalities audio
    OMP_NUM_THREADS=1 .venv/bin/python -m service.features.voice_training \\
        --data /tmp/emodb7-compare --out weights/readings/voice-emodb7

The vectors are the raw ComParE_2016 functionals our extractor stores inline. Each conversation's
vectors are normalised per speaker (speaker_norm.py, statistics of the train split); the top K
features by ANOVA F on the training speakers are kept; a multinomial logistic regression is fit.
Shrinkage, K and C are chosen by macro recall (UAR) on the dev speakers (never test). The
artefact's manifest records the grid, the dev scores and the fallback check: dev UAR when every
utterance is its own conversation (n=1) and in pairs (n=2).

Needs scikit-learn (training only).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from models.data import read_dataset_info, read_jsonl
from models.metrics import classification_metrics
from service.features.speaker_norm import SpeakerNormaliser
from service.features.voice_reading import VoiceReadingModel, save_voice_model

GRID = {"shrink": (2.0, 4.0, 8.0), "k_best": (1500, 3000, 6373), "C": (0.01, 0.1)}
EMODB_LICENCE = (
    "Emo-DB (Burkhardt et al., Interspeech 2005, TU Berlin): free for research use; files as "
    "re-distributed in github.com/sylaschacko/voice-emotion-analysis (cut or padded to 2.0 s). The "
    "weights are trained on it: research use. openSMILE (audEERING research licence) computes the inputs."
)


def load_split(path: Path, labels: list[str]) -> dict[str, Any]:
    """Raw audio vectors (N, D), label indices (N,), speakers and conversation ids of one JSONL split."""
    x, y, spk, conv = [], [], [], []
    for c in read_jsonl(path):
        for u in c.utterances:
            if "audio" in u.features and u.label is not None:
                x.append(u.features["audio"])
                y.append(labels.index(u.label))
                spk.append(u.speaker)
                conv.append(c.id)
    return {"x": np.asarray(x, np.float64), "y": np.asarray(y), "speaker": np.asarray(spk), "conv": np.asarray(conv)}


def normalise(norm: SpeakerNormaliser, split: dict[str, Any], group: np.ndarray | None = None) -> np.ndarray:
    """(N, D) vectors normalised per speaker within each conversation (or within ``group``)."""
    group = split["conv"] if group is None else group
    out = np.zeros_like(split["x"])
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        z = norm.apply(list(split["x"][rows]), list(split["speaker"][rows]))
        out[rows] = np.stack(z)
    return out


def fit_linear(z: np.ndarray, y: np.ndarray, k_best: int, c: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ANOVA-F top-``k_best`` feature indices and a logistic-regression head on them."""
    from sklearn.feature_selection import f_classif
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, _ = f_classif(z, y)
    selected = np.sort(np.argsort(-np.nan_to_num(f))[:k_best])
    lr = LogisticRegression(C=c, max_iter=3000).fit(z[:, selected], y)
    return selected, {"kind": "linear", "W": lr.coef_, "b": lr.intercept_}


def uar(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """classification_metrics of argmax predictions (with ``uar``, macro recall)."""
    return classification_metrics(y, probs.argmax(axis=1), labels)


def pairs(split: dict[str, Any], size: int) -> np.ndarray:
    """Group ids cutting each conversation into consecutive groups of ``size`` utterances."""
    out, count = [], {}
    for c in split["conv"]:
        i = count.get(c, 0)
        count[c] = i + 1
        out.append(f"{c}/{i // size}")
    return np.asarray(out)


def train(data: Path, out: Path, grid: dict[str, tuple] = GRID) -> dict[str, Any]:
    """Grid search on dev UAR, then write the artefact; returns its manifest."""
    info = read_dataset_info(data)
    labels = list(info["labels"])
    tr, dv = load_split(data / "train.jsonl", labels), load_split(data / "dev.jsonl", labels)
    trials, best = [], None
    for shrink in grid["shrink"]:
        norm = SpeakerNormaliser.fit(list(tr["x"]), shrink)
        ztr, zdv = normalise(norm, tr), normalise(norm, dv)
        for k_best in grid["k_best"]:
            for c in grid["C"]:
                selected, head = fit_linear(ztr, tr["y"], k_best, c)
                model = VoiceReadingModel(norm, selected, [head], {})
                score = uar(dv["y"], model.scores(zdv), labels)["uar"]
                trials.append({"shrink": shrink, "k_best": k_best, "C": c, "dev_uar": score})
                print(json.dumps(trials[-1]), flush=True)
                if best is None or score > best[0]:
                    best = (score, model, trials[-1])
    _, model, chosen = best
    model.manifest = manifest(info, data, labels, model, tr, dv, chosen, trials)
    save_voice_model(out, model)
    return model.manifest


def manifest(info, data, labels, model, tr, dv, chosen, trials) -> dict[str, Any]:
    """The self-description of the voice artefact (what the result's top-level ``readings.voice`` shows)."""
    dev = uar(dv["y"], model.scores(normalise(model.norm, dv)), labels)
    fallback = {
        f"n={n}": uar(dv["y"], model.scores(normalise(model.norm, dv, pairs(dv, n))), labels)["uar"] for n in (1, 2)
    }
    entry = info["feature_spec"]["audio"]
    return {
        "name": "merc-voice-emodb7",
        "labels": labels,
        "feature_spec": {"audio": {k: entry[k] for k in ("extractor", "version", "dim")}},
        "features": "openSMILE ComParE_2016 functionals (6373-d) of the utterance's 16 kHz mono cut",
        "training_data": (
            f"{info.get('name')}: Emo-DB, acted German speech, train speakers "
            f"{sorted(set(tr['speaker']))} ({len(tr['y'])} utterances); selected on dev speakers "
            f"{sorted(set(dv['speaker']))} ({len(dv['y'])} utterances); test speakers held out"
        ),
        "licence": EMODB_LICENCE,
        "accuracy": {
            "dev_uar": dev["uar"],
            "dev_accuracy": dev["accuracy"],
            "dev_macro_f1": dev["macro_f1"],
            "dev_per_class_recall": dev["per_class_recall"],
            "dev_fallback_uar": fallback,
            "where": "speaker-independent: trained on 6 Emo-DB speakers, scored on 2 unseen ones, "
            "normalised per speaker over each session of about 8 utterances; dev_fallback_uar: every "
            "utterance alone (n=1) or in pairs (n=2). Literature: openSMILE functionals + SVM, leave-one-"
            "speaker-out on full-length Emo-DB, UAR about 80-86.",
            "confusion_matrix": dev["confusion_matrix"],
        },
        "normalisation": {
            "by": "speaker within the conversation",
            "shrink": model.norm.shrink,
            "description": "z-scores over the speaker's utterances in the conversation; mean and variance "
            f"shrunk towards the training statistics with {model.norm.shrink:g} pseudo-utterances",
        },
        "selection": {"criterion": "dev UAR", "chosen": chosen, "grid": trials},
        "model": f"ANOVA-F top {len(model.selected)} features -> multinomial logistic regression (C={chosen['C']})",
        "data": {"folder": str(data), "sha256": _sha(data)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sha(data: Path) -> str:
    from models.data import file_sha256

    return file_sha256([data / "train.jsonl", data / "dev.jsonl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder made by merc extract (audio inline)")
    ap.add_argument("--out", type=Path, default=Path("weights/readings/voice-emodb7"))
    args = ap.parse_args()
    m = train(args.data, args.out)
    print(json.dumps({"out": str(args.out), "chosen": m["selection"]["chosen"], "accuracy": m["accuracy"]["dev_uar"]}))


if __name__ == "__main__":
    main()
