"""Train the voice reading (service/features/voice_reading.py) on one or more datasets ``merc extract`` made.

The English reading (``weights/readings/voice-en7``: RAVDESS + Emo-DB in MELD's seven labels)::

    .venv/bin/merc extract --data ../shared/data/ravdess8 --media ../shared/media/ravdess8 \\
        --out /tmp/merc-audio-cache/ravdess8-compare2016 --modalities audio
    .venv/bin/merc extract --data ../shared/data/emodb7 --media ../shared/media/emodb7 \\
        --out /tmp/merc-audio-cache/emodb7-compare2016 --modalities audio
    OMP_NUM_THREADS=1 .venv/bin/python -m service.features.voice_training --labels meld7 \\
        --data /tmp/merc-audio-cache/ravdess8-compare2016 --data /tmp/merc-audio-cache/emodb7-compare2016 \\
        --name merc-voice-en7 --out weights/readings/voice-en7

One dataset without ``--labels`` trains in that dataset's own labels (how voice-emodb7 was made).
With ``--labels meld7`` every corpus label is mapped onto MELD's seven (:data:`TO_MELD7`: calm ->
neutral, happy/happiness -> joy, ...); a label with no counterpart (Emo-DB's boredom) is dropped
from training and scoring, but its utterances still count in their session's speaker statistics
(a served conversation has them too).

The vectors are the raw ComParE_2016 functionals our extractor stores inline. Each conversation's
vectors are normalised per speaker (speaker_norm.py, statistics of all training corpora together);
features are ranked by ANOVA F within each corpus and the mean rank keeps the top K (pooled F would
let the larger corpus choose alone); a multinomial logistic regression is fit, optionally on a
second view of the training data where every utterance is normalised alone (the n = 1 fallback a
speaker with one utterance gets). Shrinkage, K, C and the views are chosen by the mean over corpora
of the dev speakers' macro recall (UAR over the classes present in that corpus), never on test. The
manifest records the grid, the per-corpus dev scores, per-class recall and the fallback check (every
dev utterance alone, n=1, and in pairs, n=2).

Needs scikit-learn (training only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data import read_dataset_info, read_jsonl
from models.metrics import classification_metrics
from service.features.speaker_norm import SpeakerNormaliser
from service.features.voice_reading import VoiceReadingModel, save_voice_model
from service.licences import CORPUS_LICENCES, source_corpus

MELD7 = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
"""MELD's labels in meld7's class order (../shared/data/meld7/dataset.json)."""
TO_MELD7 = {"calm": "neutral", "happy": "joy", "happiness": "joy", "sad": "sadness", "angry": "anger",
            "fearful": "fear", "surprised": "surprise"}  # fmt: skip
"""Corpus labels -> MELD's; labels already MELD's map to themselves; any other (boredom) is dropped."""
LABEL_SETS = {"meld7": (MELD7, TO_MELD7)}

GRID = {"shrink": (2.0, 4.0, 8.0), "k_best": (1500, 3000, 6373), "C": (0.01, 0.1), "single_view": (False,)}
MULTI_GRID = {"shrink": (4.0, 8.0), "k_best": (3000,), "C": (0.01, 0.03), "single_view": (False, True)}
OPENSMILE = "openSMILE (audEERING research licence) computes the inputs."
CORPORA = {
    "emodb7": {
        "about": "Emo-DB, acted German speech (10 speakers, files cut to 2.0 s)",
        "licence": f"{CORPUS_LICENCES['emodb7']}; files as re-distributed in "
        "github.com/sylaschacko/voice-emotion-analysis (cut or padded to 2.0 s)",
        "use": "research use",
    },
    "ravdess8": {
        "about": "RAVDESS speech, acted North American English (24 actors, two neutral statements)",
        "licence": CORPUS_LICENCES["ravdess8"],
        "use": "NON-COMMERCIAL use only (CC BY-NC-SA 4.0, inherited from RAVDESS)",
    },
}


def map_label(label: str | None, labels: list[str], mapping: dict[str, str] | None) -> str | None:
    """``label`` in the target ``labels`` (through ``mapping``), or None when it has no counterpart."""
    if label is None:
        return None
    target = label if mapping is None or label in labels else mapping.get(label)
    return target if target in labels else None


def load_split(path: Path, labels: list[str], mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """Raw audio vectors (N, D), label indices (N,; -1 = no counterpart), speakers, conversation ids and the
    corpus labels of one JSONL split; utterances without an audio vector (silent) are left out."""
    x, y, spk, conv, raw = [], [], [], [], []
    for c in read_jsonl(path):
        for u in c.utterances:
            if "audio" in u.features and u.label is not None:
                target = map_label(u.label, labels, mapping)
                x.append(u.features["audio"])
                y.append(-1 if target is None else labels.index(target))
                spk.append(u.speaker)
                conv.append(c.id)
                raw.append(u.label)
    return {"x": np.asarray(x, np.float64), "y": np.asarray(y), "speaker": np.asarray(spk),
            "conv": np.asarray(conv), "raw": np.asarray(raw)}  # fmt: skip


@dataclass
class Corpus:
    """One training dataset: its name, folder, dataset.json and train / dev splits."""

    name: str
    folder: Path
    info: dict[str, Any]
    train: dict[str, Any]
    dev: dict[str, Any]


def load_corpus(folder: Path, labels: list[str] | None, mapping: dict[str, str] | None) -> Corpus:
    """A dataset folder in the target ``labels`` (its own when None)."""
    info = read_dataset_info(folder)
    target = labels or list(info["labels"])
    split = {s: load_split(folder / f"{s}.jsonl", target, mapping) for s in ("train", "dev")}
    return Corpus(str(info.get("name", folder.name)), folder, info, split["train"], split["dev"])


def normalise(norm: SpeakerNormaliser, split: dict[str, Any], group: np.ndarray | None = None) -> np.ndarray:
    """(N, D) vectors normalised per speaker within each conversation (or within ``group``)."""
    group = split["conv"] if group is None else group
    out = np.zeros_like(split["x"])
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        z = norm.apply(list(split["x"][rows]), list(split["speaker"][rows]))
        out[rows] = np.stack(z)
    return out


def pairs(split: dict[str, Any], size: int) -> np.ndarray:
    """Group ids cutting each conversation into consecutive groups of ``size`` utterances."""
    out, count = [], {}
    for c in split["conv"]:
        i = count.get(c, 0)
        count[c] = i + 1
        out.append(f"{c}/{i // size}")
    return np.asarray(out)


def training_rows(norm: SpeakerNormaliser, corpora: list[Corpus], single_view: bool) -> tuple[np.ndarray, np.ndarray]:
    """Normalised training vectors and labels of every corpus (rows with a target label only); with
    ``single_view`` each utterance also appears normalised alone (the n = 1 fallback)."""
    zs, ys = [], []
    for c in corpora:
        for group in (None, np.arange(len(c.train["y"]))) if single_view else (None,):
            zs.append(normalise(norm, c.train, group))
            ys.append(c.train["y"])
    z, y = np.concatenate(zs), np.concatenate(ys)
    return z[y >= 0], y[y >= 0]


def rank_features(norm: SpeakerNormaliser, corpora: list[Corpus]) -> np.ndarray:
    """Feature indices, best first: ANOVA F ranked within each corpus's training speakers, mean rank."""
    from sklearn.feature_selection import f_classif

    ranks = np.zeros(len(norm.mean))
    for c in corpora:
        keep = c.train["y"] >= 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f, _ = f_classif(normalise(norm, c.train)[keep], c.train["y"][keep])
        ranks += np.argsort(np.argsort(-np.nan_to_num(f)))
    return np.argsort(ranks, kind="stable")


def fit_linear(z: np.ndarray, y: np.ndarray, selected: np.ndarray, c: float, clip: float) -> dict[str, np.ndarray]:
    """A multinomial logistic-regression head on the ``selected`` features of (clipped) ``z``."""
    from sklearn.linear_model import LogisticRegression

    x = np.clip(z[:, selected], -clip, clip)
    lr = LogisticRegression(C=c, max_iter=3000).fit(x, y)
    return {"kind": "linear", "W": lr.coef_, "b": lr.intercept_}


def corpus_metrics(y: np.ndarray, pred: np.ndarray, raw: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Metrics over the classes present in the gold labels (``uar``: their mean recall) and
    ``uar_corpus_labels``: mean recall over the corpus's own labels (e.g. calm and neutral apart),
    a prediction being right when it is the label's counterpart."""
    keep = y >= 0
    m = classification_metrics(y[keep], pred[keep], labels)
    present = [lab for lab in labels if m["support"][lab] > 0]
    recall = {lab: m["per_class_recall"][lab] for lab in present}
    own = {r: float(np.mean(pred[keep & (raw == r)] == y[keep & (raw == r)])) for r in sorted(set(raw[keep]))}
    return {
        "uar": round(float(np.mean(list(recall.values()))), 2),
        "accuracy": m["accuracy"],
        "per_class_recall": recall,
        "uar_corpus_labels": round(100 * float(np.mean(list(own.values()))), 2),
        "per_corpus_label_recall": {r: round(100 * v, 2) for r, v in own.items()},
        "support": {lab: m["support"][lab] for lab in present},
        "confusion_matrix": m["confusion_matrix"],
        "n": m["n"],
    }


def dev_metrics(model: VoiceReadingModel, c: Corpus, labels: list[str], group: np.ndarray | None = None) -> dict:
    """:func:`corpus_metrics` of ``model`` on a corpus's dev speakers (sessions, or ``group``)."""
    pred = model.scores(normalise(model.norm, c.dev, group)).argmax(axis=1)
    return corpus_metrics(c.dev["y"], pred, c.dev["raw"], labels)


def selection_score(model: VoiceReadingModel, corpora: list[Corpus], labels: list[str]) -> dict[str, float]:
    """Dev UAR per corpus and their mean (the selection criterion)."""
    scores = {c.name: dev_metrics(model, c, labels)["uar"] for c in corpora}
    return {**scores, "mean": round(float(np.mean(list(scores.values()))), 2)}


CLIP = 10.0
"""Normalised features are clipped to +-CLIP before the linear head (an outlying recording moves no logit far)."""


def search(corpora: list[Corpus], labels: list[str], grid: dict[str, tuple]) -> tuple[VoiceReadingModel, dict, list]:
    """Every grid point fit on the training speakers and scored on the dev speakers; the best by mean dev UAR."""
    x_train = np.concatenate([c.train["x"] for c in corpora])
    trials, best = [], None
    for shrink in grid["shrink"]:
        norm = SpeakerNormaliser.fit(list(x_train), shrink)
        order = rank_features(norm, corpora)
        for single_view in grid["single_view"]:
            z, y = training_rows(norm, corpora, single_view)
            for k_best, c in itertools.product(grid["k_best"], grid["C"]):
                selected = np.sort(order[:k_best])
                head = fit_linear(z, y, selected, c, CLIP)
                model = VoiceReadingModel(norm, selected, [head], {"normalisation": {"clip": CLIP}})
                point = {"shrink": shrink, "single_view": single_view, "k_best": int(k_best), "C": c}
                trials.append({**point, "dev_uar": selection_score(model, corpora, labels)})
                print(json.dumps(trials[-1]), flush=True)
                if best is None or trials[-1]["dev_uar"]["mean"] > best[0]:
                    best = (trials[-1]["dev_uar"]["mean"], model, trials[-1])
    assert best is not None
    return best[1], best[2], trials


def train(
    folders: list[Path], out: Path, label_set: str | None = None, name: str | None = None, grid: dict | None = None
) -> dict[str, Any]:
    """Grid search on dev UAR, then write the artefact; returns its manifest."""
    labels, mapping = LABEL_SETS[label_set] if label_set else (None, None)
    corpora = [load_corpus(f, labels, mapping) for f in folders]
    if labels is None:
        if len(corpora) > 1:
            raise ValueError("several datasets need one label set: --labels meld7")
        labels = list(corpora[0].info["labels"])
    grid = grid or (GRID if len(corpora) == 1 else MULTI_GRID)
    model, chosen, trials = search(corpora, list(labels), grid)
    model.manifest = manifest(corpora, list(labels), label_set, model, chosen, trials, name)
    save_voice_model(out, model)
    return model.manifest


def corpus_about(c: Corpus) -> dict[str, str]:
    """What CORPORA knows of a corpus (a noisy copy: its source's entry, described as a copy)."""
    base = source_corpus(c.name)
    if base not in CORPORA:
        return {"about": c.info.get("source", c.name), "licence": "see the dataset", "use": "?"}
    known = dict(CORPORA[base])
    if base != c.name:
        aug = c.info.get("augmentation", {})
        known["about"] = (
            f"a copy of {base} with white noise {aug.get('snr_db', '?')} dB under the speech, a gain within "
            f"+-{aug.get('gain_db', '?')} dB and an MP3 round trip (scripts/augment_speech.py)"
        )
    return known


def describe_corpora(corpora: list[Corpus], labels: list[str], mapping: dict[str, str] | None) -> dict[str, str]:
    """``training_data`` and ``licence`` texts of the artefact from its corpora."""
    parts, licences, uses = [], [], []
    for c in corpora:
        known = corpus_about(c)
        raw = sorted(set(c.train["raw"]) | set(c.dev["raw"]))
        dropped = [r for r in raw if map_label(r, labels, mapping) is None]
        parts.append(
            f"{c.name}: {known['about']}; train speakers {', '.join(sorted(map(str, set(c.train['speaker']))))} "
            f"({int((c.train['y'] >= 0).sum())} utterances), selected on dev speakers "
            f"{', '.join(sorted(map(str, set(c.dev['speaker']))))} ({int((c.dev['y'] >= 0).sum())}); test speakers "
            f"held out" + (f"; dropped (no counterpart): {', '.join(dropped)}" if dropped else "")
        )
        licences.append(known["licence"])
        uses.append(known["use"])
    use = next((u for u in uses if u.startswith("NON-COMMERCIAL")), uses[0])
    return {
        "training_data": "; ".join(parts),
        "licence": f"{' '.join(lic + '.' for lic in licences)} The weights are trained on them: {use}. {OPENSMILE}",
    }


def fallback_uar(model: VoiceReadingModel, c: Corpus, labels: list[str]) -> dict[str, float]:
    """Dev UAR when each utterance is normalised alone (n=1) and in pairs (n=2)."""
    return {f"n={n}": dev_metrics(model, c, labels, pairs(c.dev, n))["uar"] for n in (1, 2)}


def accuracy_block(model: VoiceReadingModel, corpora: list[Corpus], labels: list[str]) -> dict[str, Any]:
    """Measured accuracy per corpus (dev speakers), as the readings' description shows it."""
    per = {}
    for c in corpora:
        m = dev_metrics(model, c, labels)
        per[c.name] = {
            "dev_uar": m["uar"],
            "dev_accuracy": m["accuracy"],
            "dev_per_class_recall": m["per_class_recall"],
            "dev_uar_corpus_labels": m["uar_corpus_labels"],
            "dev_per_corpus_label_recall": m["per_corpus_label_recall"],
            "dev_fallback_uar": fallback_uar(model, c, labels),
            "dev_utterances": m["n"],
            "confusion_matrix": m["confusion_matrix"],
        }
    return {
        "per_corpus": per,
        "dev_uar": round(float(np.mean([p["dev_uar"] for p in per.values()])), 2),
        "where": "speaker-independent: dev speakers unseen in training, normalised per speaker over each session "
        "of about 8 utterances; dev_uar: mean recall over the classes present in that corpus (dev_uar at the top: "
        "the mean over corpora); dev_uar_corpus_labels: over the corpus's own labels (RAVDESS calm and neutral "
        "apart, both read right as neutral); dev_fallback_uar: every utterance alone (n=1) or in pairs (n=2)",
    }


def manifest(corpora, labels, label_set, model, chosen, trials, name) -> dict[str, Any]:
    """The self-description of the voice artefact (what the result's top-level ``readings.voice`` shows)."""
    entry = corpora[0].info["feature_spec"]["audio"]
    for c in corpora[1:]:
        if c.info["feature_spec"]["audio"]["version"] != entry["version"]:
            raise ValueError(f"{c.folder}: audio features {c.info['feature_spec']['audio']} differ from {entry}")
    mapping = LABEL_SETS[label_set][1] if label_set else None
    return {
        "name": name or "merc-voice-" + "-".join(c.name for c in corpora),
        "labels": labels,
        "label_mapping": {"labels": label_set, "to": mapping} if label_set else None,
        "feature_spec": {"audio": {k: entry[k] for k in ("extractor", "version", "dim")}},
        "features": "openSMILE ComParE_2016 functionals (6373-d) of the utterance's 16 kHz mono cut",
        **describe_corpora(corpora, labels, mapping),
        "accuracy": accuracy_block(model, corpora, labels),
        "normalisation": {
            "by": "speaker within the conversation",
            "shrink": model.norm.shrink,
            "clip": CLIP,
            "description": "z-scores over the speaker's utterances in the conversation; mean and variance "
            f"shrunk towards the training statistics with {model.norm.shrink:g} pseudo-utterances; clipped "
            f"to +-{CLIP:g}",
        },
        "selection": {"criterion": "mean over corpora of the dev speakers' UAR", "chosen": chosen, "grid": trials},
        "model": f"ANOVA-F (ranked within each corpus, mean rank) top {len(model.selected)} features -> multinomial "
        f"logistic regression (C={chosen['C']})"
        + (", also fit on utterances normalised alone" if chosen["single_view"] else ""),
        "data": {c.name: {"folder": str(c.folder), "sha256": _sha(c.folder)} for c in corpora},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sha(data: Path) -> str:
    from models.data import file_sha256

    return file_sha256([data / "train.jsonl", data / "dev.jsonl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, action="append", required=True,
                    help="dataset folder made by merc extract (audio inline); repeat for several corpora")  # fmt: skip
    ap.add_argument("--labels", choices=sorted(LABEL_SETS), default=None, help="map every corpus onto this label set")
    ap.add_argument("--name", default=None, help="the model's name in results (default merc-voice-CORPORA)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    m = train(args.data, args.out, args.labels, args.name)
    print(json.dumps({"out": str(args.out), "chosen": m["selection"]["chosen"], "accuracy": m["accuracy"]["dev_uar"]}))


if __name__ == "__main__":
    main()
