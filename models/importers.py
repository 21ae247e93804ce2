"""Importers from public dataset files into the project's canonical conversation format.

Canonical format
================

A dataset is a folder with ``dataset.json`` and one JSONL file per split
(``train.jsonl``, ``dev.jsonl``, ``test.jsonl``). Each line of a JSONL file is one
conversation::

    {"id": "meld-train-dia0", "dataset": "meld7", "split": "train",
     "media": {"season": 8, "episode": 21},
     "utterances": [
       {"id": "dia0_utt0", "speaker": "Chandler", "text": "also I was the point person ...",
        "start": 976.059, "end": 981.731, "label": "neutral"}]}

- ``id``: unique conversation id; ``dataset``: the dataset's name (``dataset.json``'s
  ``name``); ``split``: ``train`` / ``dev`` / ``test``.
- ``utterances``: in conversation order. Each has an ``id`` (unique within the
  dataset), a ``speaker`` (any string; speakers are compared within a conversation),
  ``text`` (string, or null when there is none), ``start`` / ``end`` (seconds, or
  null when unknown) and ``label`` (a name from ``dataset.json``'s ``labels``; null or
  absent for unlabelled utterances).
- ``features`` (optional, per utterance): modality (``text``, ``audio``, ``visual``)
  -> list of floats, all utterances of a dataset with the same dimension per modality.
- Extra keys (MELD's ``sentiment``, ``media``, ...) are allowed and ignored.

``dataset.json`` holds ``name``, ``labels`` (their order is the class order),
``source`` and ``splits`` (per split: ``conversations``, ``utterances``,
``label_counts``, ``file``).

MELD
====

:func:`import_meld_csv` reads the official CSVs of declare-lab/MELD
(``data/MELD/{train,dev,test}_sent_emo.csv``; columns ``Sr No., Utterance, Speaker,
Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime``)
into conversations ``meld-{split}-dia{Dialogue_ID}`` with utterances
``dia{Dialogue_ID}_utt{Utterance_ID}``, ordered by the two ids. Times
(``"00:16:16,059"``) become seconds (976.059). The CSV text carries mojibake (``\\x92``,
``â€™``, ...), which :func:`fix_mojibake` repairs into the intended characters
(``’`` ...), as in the converted files of ``../shared/data/meld7``. Utterances keep
MELD's ``sentiment`` as an extra key. :func:`import_meld_dir` converts a folder of
CSVs and writes ``dataset.json``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

MELD7_LABELS: tuple[str, ...] = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
MELD_SOURCE = "MELD (Poria et al., ACL 2019), CSVs from declare-lab/MELD data/MELD (GPL-3.0)"
MELD_COLUMNS: tuple[str, ...] = (
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
)
MELD_SPLIT_FILES: dict[str, str] = {
    "train": "train_sent_emo.csv",
    "dev": "dev_sent_emo.csv",
    "test": "test_sent_emo.csv",
}

# ----------------------------------------------------------------------------- text

# cp1252 characters in 0x80..0x9F, as decoded; a UTF-8 continuation byte read as cp1252
# becomes one of these or a Latin-1 character in U+0080..U+00BF.
_CP1252_HIGH = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_CONT = "[\u0080-\u00bf" + re.escape(_CP1252_HIGH) + "]"
_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")
_C1 = re.compile("[\u0080-\u009f]")


def _as_byte(ch: str) -> int:
    if ord(ch) < 256:
        return ord(ch)
    return ch.encode("cp1252")[0]


def _undo_double_encoding(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        return bytes(_as_byte(ch) for ch in run).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return run


def _c1_to_cp1252(match: re.Match[str]) -> str:
    try:
        return bytes([ord(match.group(0))]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D: undefined in cp1252
        return ""


def fix_mojibake(text: str) -> str:
    """Repair the common encoding damage of MELD's text.

    - UTF-8 read as cp1252 / Latin-1 (``"â€™"``, ``"â\\x80\\x99"``, ``"Ã©"``) -> the
      intended character (``’``, ``é``); a ``"â€"`` whose last byte was lost -> ``”``.
    - C1 control characters, cp1252 bytes read as Latin-1 (``"\\x92"``, ``"\\x85"``,
      ``"\\x97"``) -> their cp1252 meaning (``’``, ``…``, ``—``).

    Anything else, whitespace included, is left as it is.
    """
    if text.isascii():
        return text
    text = _MOJIBAKE.sub(_undo_double_encoding, text)
    text = text.replace("â€", "”")
    return _C1.sub(_c1_to_cp1252, text)


def parse_time(value: str | None) -> float | None:
    """``"hh:mm:ss,mmm"`` (also ``mm:ss,mmm``, ``.`` as separator, plain seconds) -> seconds.

    Returns None for empty or malformed values.
    """
    if value is None:
        return None
    value = value.strip().replace(",", ".")
    if not value:
        return None
    try:
        seconds = 0.0
        for part in value.split(":"):
            seconds = seconds * 60.0 + float(part)
    except ValueError:
        return None
    if value.count(":") > 2 or seconds < 0:
        return None
    return round(seconds, 3)


# ----------------------------------------------------------------------------- MELD


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _split_from_name(path: Path) -> str:
    for split, name in MELD_SPLIT_FILES.items():
        if path.name == name or path.name.startswith(f"{split}_"):
            return split
    raise ValueError(f"cannot tell the split of {path.name}; pass split=")


def import_meld_csv(
    csv_path: str | Path,
    split: str | None = None,
    *,
    dataset: str = "meld7",
    labels: Sequence[str] = MELD7_LABELS,
) -> list[dict[str, Any]]:
    """Conversations of one MELD CSV in the canonical format.

    Args:
        csv_path: ``{train,dev,test}_sent_emo.csv`` of declare-lab/MELD (UTF-8; cp1252
            accepted).
        split: ``train`` / ``dev`` / ``test``; by default taken from the file name.
        dataset: value of each conversation's ``dataset``.
        labels: allowed emotion names (the CSV's ``Emotion``, lower-cased).

    Returns:
        Conversations ordered by ``Dialogue_ID``, utterances by ``Utterance_ID``.

    Raises:
        ValueError: missing column, unknown emotion, bad id, or a repeated
            (Dialogue_ID, Utterance_ID), with the CSV line number.
    """
    path = Path(csv_path)
    split = split or _split_from_name(path)
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    fields = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = fields
    missing = [name for name in MELD_COLUMNS if name not in fields]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {fields}")
    allowed = set(labels)

    dialogues: dict[int, dict[str, Any]] = {}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
            continue  # blank line
        try:
            dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: bad Dialogue_ID / Utterance_ID") from None
        label = (row["Emotion"] or "").strip().lower()
        if label not in allowed:
            raise ValueError(f"{where}: unknown emotion {row['Emotion']!r}; expected one of {list(labels)}")
        text = fix_mojibake(row["Utterance"]) if row["Utterance"] is not None else None
        utterance: dict[str, Any] = {
            "id": f"dia{dia}_utt{utt}",
            "speaker": fix_mojibake((row["Speaker"] or "").strip()),
            "text": text,
            "start": parse_time(row["StartTime"]),
            "end": parse_time(row["EndTime"]),
            "label": label,
            "sentiment": (row["Sentiment"] or "").strip().lower() or None,
        }
        dialogue = dialogues.setdefault(dia, {"media": _media(row), "utterances": {}})
        if utt in dialogue["utterances"]:
            raise ValueError(f"{where}: repeated utterance dia{dia}_utt{utt}")
        dialogue["utterances"][utt] = utterance

    return [
        {
            "id": f"meld-{split}-dia{dia}",
            "dataset": dataset,
            "split": split,
            "media": dialogues[dia]["media"],
            "utterances": [dialogues[dia]["utterances"][utt] for utt in sorted(dialogues[dia]["utterances"])],
        }
        for dia in sorted(dialogues)
    ]


def _media(row: Mapping[str, str | None]) -> dict[str, int | None]:
    def as_int(value: str | None) -> int | None:
        try:
            return int(str(value).strip())
        except ValueError:
            return None

    return {"season": as_int(row.get("Season")), "episode": as_int(row.get("Episode"))}


# ----------------------------------------------------------------------------- files


def write_jsonl(convs: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write conversations one per line (UTF-8, no ASCII escaping); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for conv in convs:
            handle.write(json.dumps(conv, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Conversations of a canonical JSONL file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def split_summary(convs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """``{"conversations", "utterances", "label_counts"}`` of one split, counts in ``labels`` order."""
    counts = Counter(u.get("label") for conv in convs for u in conv["utterances"])
    return {
        "conversations": len(convs),
        "utterances": sum(len(conv["utterances"]) for conv in convs),
        "label_counts": {name: counts.get(name, 0) for name in labels},
    }


def write_dataset_json(
    path: str | Path,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    name: str = "meld7",
    labels: Sequence[str] = MELD7_LABELS,
    source: str = MELD_SOURCE,
    task: str = "utterance emotion classification in multi-party conversations",
    notes: str | None = "start/end are seconds within the TV episode (Season/Episode given).",
) -> Path:
    """Write ``dataset.json`` (a file path, or a folder to put it in); returns its path.

    ``splits`` maps a split name to its conversations; each split is listed with its
    conversation / utterance / label counts and ``file`` (``{split}.jsonl``).
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path / "dataset.json"
    info: dict[str, Any] = {
        "name": name,
        "task": task,
        "labels": list(labels),
        "modalities_inline": [],
        "source": source,
    }
    if notes:
        info["notes"] = notes
    info["splits"] = {
        split: {**split_summary(convs, labels), "file": f"{split}.jsonl"} for split, convs in splits.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def import_meld_dir(csv_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Convert the MELD CSVs found in ``csv_dir`` to ``out_dir/{split}.jsonl`` + ``dataset.json``.

    Returns split -> written JSONL path, plus ``"dataset.json"`` -> its path.
    """
    csv_dir, out_dir = Path(csv_dir), Path(out_dir)
    splits: dict[str, list[dict[str, Any]]] = {}
    written: dict[str, Path] = {}
    for split, filename in MELD_SPLIT_FILES.items():
        source = csv_dir / filename
        if source.exists():
            splits[split] = import_meld_csv(source, split)
            written[split] = write_jsonl(splits[split], out_dir / f"{split}.jsonl")
    if not splits:
        raise FileNotFoundError(f"none of {sorted(MELD_SPLIT_FILES.values())} in {csv_dir}")
    written["dataset.json"] = write_dataset_json(out_dir, splits)
    return written
