"""`merc extract`: a canonical dataset folder + a media root -> a dataset folder with media features inline.

Media lookup, per conversation:

* one file for the whole conversation, ``MEDIA_ROOT/**/{conversation id}.{ext}``, cut by the
  utterances' ``start``/``end``; else
* one file per utterance, ``MEDIA_ROOT/**/{utterance id}.{ext}`` (MELD's public layout
  ``train_splits/dia{D}_utt{U}.mp4``, ...; when an id exists in several folders, the one whose path
  names the conversation's split wins), each file being the whole utterance.

Output: the same ``*.jsonl`` files with ``features.audio`` / ``features.visual`` per utterance (left
out where the modality is absent) and a ``dataset.json`` whose ``feature_spec`` names the real
extractors, versions and options, which ``merc train`` reads (see service/features/datasets.py). Text stays
text: the trainer encodes it (cached).

Resumable: each split is written to ``{split}.jsonl.partial`` one conversation per line and renamed
when complete; a rerun skips conversations already there. A bad media file is logged to
``errors.jsonl`` (and stderr) and its utterances get the modality absent; the run goes on.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.data import Conversation, DataError, Utterance, parse_conversation, read_dataset_info
from service.inference.pipeline import MediaInput, extract_features
from service.media.decode import AUDIO_SUFFIXES, VIDEO_SUFFIXES, MediaError

MEDIA_MODALITIES = ("audio", "visual")


class MediaIndex:
    """File stem -> media paths under a root (scanned once)."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"{root}: media root is not a folder")
        self.root = root
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in VIDEO_SUFFIXES + AUDIO_SUFFIXES and path.is_file():
                self.by_stem[path.stem].append(path)

    def find(self, stem: str, split: str | None) -> Path | None:
        """The file named ``stem``; among several, the first whose relative path mentions ``split``."""
        paths = self.by_stem.get(stem, [])
        if len(paths) > 1 and split:
            paths = [p for p in paths if split in str(p.relative_to(self.root))] or paths
        return paths[0] if paths else None


def bundle_media_spec(bundle_dir: Path) -> dict[str, dict]:
    """The audio/visual entries of a bundle's feature spec (without serve-time ``normalise``); DataError
    when the bundle has none computed from media (text-only, or inline vectors)."""
    from models.bundle import read_manifest

    spec = {
        m: {k: v for k, v in e.items() if k != "normalise"}
        for m, e in read_manifest(bundle_dir)["feature_spec"].items()
        if m in MEDIA_MODALITIES and e.get("version") != "inline"
    }
    if not spec:
        raise DataError(f"{bundle_dir}: the bundle uses no audio or visual features computed from media")
    return spec


def media_input(path: Path) -> MediaInput:
    return MediaInput(audio=path) if path.suffix.lower() in AUDIO_SUFFIXES else MediaInput(video=path)


def _log_error(log: Path, conv: Conversation, utt: str | None, path: Path | None, error: Exception) -> None:
    record = {"conversation": conv.id, "utterance": utt, "file": str(path) if path else None, "error": str(error)}
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(f"skipped {path}: {error}", file=sys.stderr)


def conversation_media_features(
    conv: Conversation, spec: dict[str, dict], index: MediaIndex, device: str, log: Path
) -> dict[str, list]:
    """modality -> one vector or None per utterance, from the conversation's or the utterances' files."""
    n = len(conv.utterances)
    feats: dict[str, list] = {m: [None] * n for m in spec}
    whole = index.find(conv.id, conv.split)
    jobs = [(whole, conv, list(range(n)))] if whole else []
    if not whole:
        for i, u in enumerate(conv.utterances):
            path = index.find(u.id, conv.split)
            if path is not None:
                single = Conversation(conv.id, [Utterance(u.id, u.speaker, u.text)], conv.dataset, conv.split)
                jobs.append((path, single, [i]))
    for path, part, rows in jobs:
        try:
            got, _ = extract_features(part, spec, media_input(path), device, readings=False)
        except (MediaError, DataError) as e:
            _log_error(log, conv, None if part is conv else part.utterances[0].id, path, e)
            continue
        for m in spec:
            for row, vec in zip(rows, got[m], strict=True):
                feats[m][row] = vec
    return feats


def _done_ids(partial: Path) -> set[str]:
    """Conversation ids fully written to ``partial``; a torn last line (interrupted write) is dropped."""
    if not partial.exists():
        return set()
    good, ids = [], set()
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(json.loads(line)["id"])
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    partial.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return ids


def _with_features(raw: dict[str, Any], feats: dict[str, list]) -> dict[str, Any]:
    for j, utt in enumerate(raw["utterances"]):
        merged = dict(utt.get("features") or {})
        for m, vectors in feats.items():
            merged.pop(m, None)
            if vectors[j] is not None:
                merged[m] = [round(float(v), 6) for v in vectors[j]]
        utt["features"] = merged
    return raw


def extract_split(src: Path, dst: Path, spec, index: MediaIndex, device: str, progress: bool) -> int:
    """One JSONL file; returns the number of conversations processed now (0 when already complete)."""
    if dst.exists():
        return 0
    partial = dst.with_name(dst.name + ".partial")
    done = _done_ids(partial)
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    count = 0
    with partial.open("a", encoding="utf-8") as out:
        for lineno, line in enumerate(tqdm(lines, desc=src.name, disable=not progress, unit="conv"), 1):
            raw = json.loads(line)
            conv = parse_conversation(raw, f"{src.name}:{lineno}")
            if conv.id in done:
                continue
            feats = conversation_media_features(conv, spec, index, device, dst.parent / "errors.jsonl")
            raw["id"] = conv.id
            out.write(json.dumps(_with_features(raw, feats)) + "\n")
            out.flush()
            count += 1
    partial.replace(dst)
    return count


def extract_dataset(
    data: Path,
    media_root: Path,
    out: Path,
    spec: dict[str, dict],
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Extract ``spec``'s media modalities for every ``*.jsonl`` of ``data``; write ``out``."""
    info = read_dataset_info(data)
    index = MediaIndex(media_root)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise DataError(f"{data}: no *.jsonl files")
    counts = {f.name: extract_split(f, out / f.name, spec, index, device, progress) for f in files}
    info = dict(info)
    info["feature_spec"] = {**(info.get("feature_spec") or {}), **spec}
    info["modalities_inline"] = ["text", *[m for m in MEDIA_MODALITIES if m in spec]]
    info["extracted_from"] = {"data": str(data), "media_root": str(media_root)}
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    errors = out / "errors.jsonl"
    n_errors = sum(1 for _ in errors.open()) if errors.exists() else 0
    return {"out": str(out), "conversations": counts, "errors": n_errors}


__all__ = ["MediaIndex", "bundle_media_spec", "conversation_media_features", "extract_dataset", "extract_split"]
