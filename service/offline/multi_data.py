"""Training on several dataset folders at once: one label space, per-dataset modalities.

``merc train --data A --data B --label-map calm=neutral,boredom=`` reads every folder's train.jsonl
and dev.jsonl into one training set and one dev set. The labels are the FIRST folder's (its
dataset.json, in class order); every other label must map onto them through ``--label-map``
(``old=new``; ``old=`` drops it: such utterances stay in their conversations unlabelled, as context
and speaker statistics, never as a target). ``--data-modalities NAME=audio`` keeps only the listed
modalities of dataset NAME (text left out sets the utterances' text to None: absent, not encoded).

The feature spec of the union is merged from the folders' dataset.json (a modality two folders
describe differently is an error: the model would mix vectors of different extractors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.common import MODALITIES
from models.data import Conversation, DataError, read_dataset_info, read_jsonl

SPEC_KEYS = ("extractor", "version", "dim")


def parse_label_map(text: str | None) -> dict[str, str | None]:
    """ "calm=neutral,happy=joy,boredom=" -> {"calm": "neutral", "happy": "joy", "boredom": None}."""
    out: dict[str, str | None] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        old, sep, new = (s.strip() for s in pair.partition("="))
        if not sep or not old:
            raise ValueError(f"--label-map {pair!r}: expected OLD=NEW (or OLD= to drop the label)")
        if old in out:
            raise ValueError(f"--label-map: {old!r} is mapped twice")
        out[old] = new or None
    return out


def parse_data_modalities(items: Sequence[str] | None) -> dict[str, list[str]]:
    """["ravdess8=audio", "emodb7=audio"] -> {"ravdess8": ["audio"], ...} (comma-separated modalities)."""
    out: dict[str, list[str]] = {}
    for item in items or ():
        name, sep, mods = item.partition("=")
        chosen = [m.strip() for m in mods.split(",") if m.strip()]
        if not sep or not name.strip() or not chosen:
            raise ValueError(f"--data-modalities {item!r}: expected DATASET=MODALITY[,MODALITY]")
        unknown = set(chosen) - set(MODALITIES)
        if unknown:
            raise ValueError(f"--data-modalities {item!r}: unknown modalities {sorted(unknown)}")
        out[name.strip()] = chosen
    return out


@dataclass
class Source:
    """One dataset folder's part of the training data."""

    name: str
    folder: Path
    modalities: list[str] | None  # None: all it has
    train: list[Conversation]
    dev: list[Conversation]

    def summary(self) -> dict[str, Any]:
        count = lambda convs: sum(len(c.utterances) for c in convs)  # noqa: E731
        labelled = lambda convs: sum(u.label is not None for c in convs for u in c.utterances)  # noqa: E731
        return {
            "name": self.name,
            "files": [str(self.folder / "train.jsonl"), str(self.folder / "dev.jsonl")],
            "modalities": self.modalities or "all",
            "train_utterances": count(self.train),
            "train_labelled": labelled(self.train),
            "dev_utterances": count(self.dev),
            "dev_labelled": labelled(self.dev),
        }


@dataclass
class TrainingData:
    """The union of one or more dataset folders: info (dataset.json-like), conversations and their sources."""

    info: dict[str, Any]
    sources: list[Source]
    label_map: dict[str, str | None] = field(default_factory=dict)

    @property
    def train(self) -> list[Conversation]:
        return [c for s in self.sources for c in s.train]

    @property
    def dev(self) -> list[Conversation]:
        return [c for s in self.sources for c in s.dev]

    @property
    def files(self) -> list[Path]:
        return [s.folder / f for s in self.sources for f in ("train.jsonl", "dev.jsonl")]

    def dev_slices(self) -> dict[str, slice]:
        """Dataset name -> the positions of its conversations in :attr:`dev`."""
        out, start = {}, 0
        for s in self.sources:
            out[s.name] = slice(start, start + len(s.dev))
            start += len(s.dev)
        return out


def map_labels(convs: list[Conversation], mapping: dict[str, str | None], labels: Sequence[str], where: str) -> None:
    """Rename labels in place through ``mapping`` (None: unlabelled); DataError for a label outside ``labels``."""
    allowed = set(labels)
    for conv in convs:
        for u in conv.utterances:
            if u.label is None:
                continue
            new = mapping.get(u.label, u.label)
            if new is not None and new not in allowed:
                raise DataError(
                    f"{where}: label {u.label!r} is not one of {list(labels)}; map it with --label-map {u.label}=LABEL "
                    f"(or {u.label}= to drop it)"
                )
            u.label = new


def keep_modalities(convs: list[Conversation], modalities: Sequence[str]) -> None:
    """Leave only ``modalities`` in every utterance (in place): text None unless kept, other vectors dropped."""
    for conv in convs:
        for u in conv.utterances:
            if "text" not in modalities:
                u.text = None
            u.features = {m: v for m, v in u.features.items() if m in modalities}


def merged_spec(infos: list[tuple[str, dict[str, Any], list[str] | None]]) -> dict[str, dict[str, Any]]:
    """The union of the folders' feature specs (only the modalities each contributes); DataError on a clash."""
    spec: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for name, info, mods in infos:
        for m, entry in (info.get("feature_spec") or {}).items():
            if mods is not None and m not in mods:
                continue
            if m in spec and any(spec[m].get(k) != entry.get(k) for k in SPEC_KEYS):
                raise DataError(
                    f"{m} features of {name} ({entry.get('extractor')}, {entry.get('version')}) differ from those "
                    f"of {owner[m]} ({spec[m].get('extractor')}, {spec[m].get('version')}): extract them alike"
                )
            spec.setdefault(m, dict(entry))
            owner.setdefault(m, name)
    return spec


def load_training_data(
    folders: Sequence[Path],
    label_map: dict[str, str | None] | None = None,
    data_modalities: dict[str, list[str]] | None = None,
) -> TrainingData:
    """Read and merge ``folders`` (the first one's labels are the label space); see the module doc."""
    if not folders:
        raise DataError("--data: at least one dataset folder is needed")
    label_map, data_modalities = dict(label_map or {}), dict(data_modalities or {})
    infos = [read_dataset_info(f) for f in folders]
    names = [str(info.get("name") or Path(f).name) for info, f in zip(infos, folders, strict=True)]
    if len(set(names)) != len(names):
        raise DataError(f"--data: a dataset appears twice ({names})")
    unknown = set(data_modalities) - set(names)
    if unknown:
        raise DataError(f"--data-modalities: no dataset named {sorted(unknown)} among {names}")
    labels = list(infos[0]["labels"])
    sources = []
    for folder, name in zip(folders, names, strict=True):
        mods = data_modalities.get(name)
        train, dev = read_jsonl(Path(folder) / "train.jsonl"), read_jsonl(Path(folder) / "dev.jsonl")
        for split, convs in (("train", train), ("dev", dev)):
            map_labels(convs, label_map, labels, f"{Path(folder) / split}.jsonl")
            if mods is not None:
                keep_modalities(convs, mods)
        sources.append(Source(name, Path(folder), mods, train, dev))
    if len(folders) == 1 and not data_modalities:
        return TrainingData(infos[0], sources, label_map)
    spec = merged_spec([(n, i, data_modalities.get(n)) for n, i in zip(names, infos, strict=True)])
    pairs = zip(names, infos, strict=True)
    offered = [data_modalities.get(n) or i.get("modalities_inline") or ["text"] for n, i in pairs]
    inline = [m for m in MODALITIES if any(m in mods for mods in offered)]
    info = {"name": "+".join(names), "labels": labels, "feature_spec": spec, "modalities_inline": inline}
    return TrainingData(info, sources, label_map)


__all__ = ["TrainingData", "load_training_data", "parse_data_modalities", "parse_label_map"]
