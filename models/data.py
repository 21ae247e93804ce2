"""Conversations in the canonical JSONL format, and their tensor form.

The canonical format (what users bring; see docs/data-format.md) is one JSON object
per line, one conversation each::

    {"id": "meld-train-dia0", "dataset": "meld7", "split": "train",
     "utterances": [{"id": "dia0_utt0", "speaker": "Chandler", "text": "...",
                     "start": 976.059, "end": 981.731, "label": "neutral",
                     "features": {"audio": [0.1, ...]}}]}

``label`` is optional (unlabelled data can be predicted), ``text``, ``start`` and
``end`` may be null, ``features`` (optional) maps a modality to a vector computed
elsewhere ("inline" features). Unknown keys are ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.common import IGNORE_INDEX, MODALITIES


class DataError(ValueError):
    """Malformed conversation data; the message names the file, line and field."""


@dataclass
class Utterance:
    id: str
    speaker: str
    text: str | None = None
    start: float | None = None
    end: float | None = None
    label: str | None = None
    features: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Conversation:
    id: str
    utterances: list[Utterance]
    dataset: str | None = None
    split: str | None = None


def _optional_number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number or null, got {value!r}")
    return float(value)


def parse_utterance(raw: Any, where: str) -> Utterance:
    """One utterance object -> Utterance, with errors naming ``where`` and the field."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object")
    speaker = raw.get("speaker")
    if speaker is None or str(speaker) == "":
        raise DataError(f"{where}.speaker: missing")
    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}.text: expected a string or null")
    start = _optional_number(raw.get("start"), f"{where}.start")
    end = _optional_number(raw.get("end"), f"{where}.end")
    if start is not None and end is not None and end < start:
        raise DataError(f"{where}.end: {end} is before start {start}")
    feats = raw.get("features") or {}
    if not isinstance(feats, dict):
        raise DataError(f"{where}.features: expected an object")
    for m, vec in feats.items():
        if m not in MODALITIES:
            raise DataError(f"{where}.features.{m}: unknown modality (expected {MODALITIES})")
        if vec is not None and not isinstance(vec, list):
            raise DataError(f"{where}.features.{m}: expected a list of numbers")
    label = raw.get("label")
    return Utterance(
        id=str(raw.get("id", "")),
        speaker=str(speaker),
        text=text,
        start=start,
        end=end,
        label=None if label is None else str(label),
        features={m: v for m, v in feats.items() if v is not None},
    )


def parse_conversation(raw: Any, where: str) -> Conversation:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object")
    utts = raw.get("utterances")
    if not isinstance(utts, list) or not utts:
        raise DataError(f"{where}.utterances: expected a non-empty list")
    parsed = [parse_utterance(u, f"{where}.utterances[{i}]") for i, u in enumerate(utts)]
    for i, u in enumerate(parsed):
        if not u.id:
            u.id = f"utt{i}"
    return Conversation(str(raw.get("id", where)), parsed, raw.get("dataset"), raw.get("split"))


def read_jsonl(path: str | Path) -> list[Conversation]:
    """Read a canonical JSONL file. Raises DataError naming line and field on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    convs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            convs.append(parse_conversation(raw, f"{path.name}:{lineno}"))
    if not convs:
        raise DataError(f"{path}: no conversations")
    return convs


def read_dataset_info(folder: str | Path) -> dict[str, Any]:
    """The folder's dataset.json (labels in class order, feature_spec, ...)."""
    info_path = Path(folder) / "dataset.json"
    if not info_path.is_file():
        raise DataError(f"{info_path}: missing (it names the labels in class order)")
    info = json.loads(info_path.read_text())
    if not isinstance(info.get("labels"), list) or not info["labels"]:
        raise DataError(f"{info_path}.labels: expected a non-empty list")
    return info


def file_sha256(paths: Iterable[str | Path]) -> str:
    """One hash over the bytes of the given files, in order (data provenance)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def speaker_ids(speakers: Sequence[str], n_speakers: int) -> np.ndarray:
    """Per-conversation speaker index by order of first appearance.

    Names are not shared across conversations (MELD has hundreds, users bring any),
    so "the first person to speak" is index 0, the second 1, ... Speakers beyond
    ``n_speakers - 1`` share the last index. Returns (n,) int64.
    """
    order: dict[str, int] = {}
    for s in speakers:
        order.setdefault(s, min(len(order), n_speakers - 1))
    return np.array([order[s] for s in speakers], dtype=np.int64)


@dataclass
class EncodedConversation:
    """A conversation as arrays: the unit of batching.

    features: modality -> (n, D_m) float32 (zeros where absent); present: (n, M) bool;
    speakers: (n,) int64; labels: (n,) int64 with IGNORE_INDEX where unlabelled.
    """

    id: str
    features: dict[str, np.ndarray]
    present: np.ndarray
    speakers: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.speakers)


def label_indices(conv: Conversation, labels: Sequence[str], where: str = "") -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    out = np.full(len(conv.utterances), IGNORE_INDEX, dtype=np.int64)
    for i, u in enumerate(conv.utterances):
        if u.label is None:
            continue
        if u.label not in index:
            raise DataError(f"{where or conv.id}: utterance {u.id!r} label {u.label!r} is not one of {list(labels)}")
        out[i] = index[u.label]
    return out


def encode_conversation(
    conv: Conversation,
    features: dict[str, list[np.ndarray | None]],
    dims: dict[str, int],
    labels: Sequence[str],
    n_speakers: int,
) -> EncodedConversation:
    """Arrays for one conversation.

    features: modality -> one vector (D_m,) or None (absent) per utterance, for every
    modality in ``dims``. A vector of the wrong size or with non-finite values is an
    error; None marks the modality absent for that utterance.
    """
    n = len(conv.utterances)
    present = np.zeros((n, len(MODALITIES)), dtype=bool)
    feats = {}
    for m, dim in dims.items():
        arr = np.zeros((n, dim), dtype=np.float32)
        vectors = features[m]
        if len(vectors) != n:
            raise DataError(f"{conv.id}: {len(vectors)} {m} vectors for {n} utterances")
        for i, vec in enumerate(vectors):
            if vec is None:
                continue
            vec = np.asarray(vec, dtype=np.float32)
            if vec.shape != (dim,):
                raise DataError(
                    f"{conv.id}: utterance {conv.utterances[i].id!r} {m} features have shape "
                    f"{vec.shape}, expected ({dim},)"
                )
            if not np.isfinite(vec).all():
                raise DataError(f"{conv.id}: utterance {conv.utterances[i].id!r} {m} features not finite")
            arr[i] = vec
            present[i, MODALITIES.index(m)] = True
        feats[m] = arr
    spk = speaker_ids([u.speaker for u in conv.utterances], n_speakers)
    return EncodedConversation(conv.id, feats, present, spk, label_indices(conv, labels))


def inline_features(conv: Conversation, modality: str) -> list[np.ndarray | None]:
    """The vectors a conversation carries inline for ``modality`` (None where absent)."""
    return [
        np.asarray(u.features[modality], dtype=np.float32) if modality in u.features else None for u in conv.utterances
    ]
