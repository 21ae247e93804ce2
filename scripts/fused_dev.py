"""What audio adds to a text+audio bundle, and what text-only conversations lose, on dev files.

For each speech dev file (speech sessions with their fixed sentences as text and merc-extract'ed audio):
UAR with text and audio (what an upload with a transcript gives the bundle), audio alone (text dropped)
and text alone (audio dropped). For each text dev file: weighted F1 (text only: no audio there).
UAR is averaged over the classes present in the file (Emo-DB has no surprise). Prints a JSON document.

    .venv/bin/python scripts/fused_dev.py --bundle weights/sdt-meld7-av \\
        --text meld7=../shared/data/meld7/dev.jsonl \\
        --speech ravdess8=/tmp/merc-audio-cache/ravdess8-compare2016/dev.jsonl \\
        --speech emodb7=/tmp/merc-audio-cache/emodb7-compare2016/dev.jsonl \\
        --label-map calm=neutral,happy=joy,happiness=joy,sad=sadness,angry=anger,fearful=fear,\
surprised=surprise,boredom=
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.offline.evaluation import evaluate_bundle
from service.offline.multi_data import parse_label_map

VIEWS = {"text+audio": (), "audio alone": ("text",), "text alone": ("audio",)}


def present_uar(metrics: dict[str, Any]) -> float:
    """Mean recall (percent) over the classes with gold support in the file."""
    recalls = [r for name, r in metrics["per_class_recall"].items() if metrics["support"][name] > 0]
    return round(sum(recalls) / len(recalls), 2)


def named(items: list[str]) -> dict[str, Path]:
    return {name: Path(path) for name, _, path in (item.partition("=") for item in items)}


def run(bundle: Path, text: dict[str, Path], speech: dict[str, Path], mapping: dict) -> dict[str, Any]:
    """{"text": name -> weighted F1 and UAR, "speech": name -> view -> UAR and per-class recall}."""
    out: dict[str, Any] = {"bundle": str(bundle), "text": {}, "speech": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in text.items():
            m = evaluate_bundle(bundle, path, Path(tmp) / name, progress=False, label_map=mapping)
            out["text"][name] = {"weighted_f1": m["weighted_f1"], "accuracy": m["accuracy"], "n": m["n"]}
        for name, path in speech.items():
            out["speech"][name] = {}
            for view, drop in VIEWS.items():
                m = evaluate_bundle(bundle, path, Path(tmp) / name, progress=False, drop=drop, label_map=mapping)
                recall = {k: v for k, v in m["per_class_recall"].items() if m["support"][k] > 0}
                out["speech"][name][view] = {"uar": present_uar(m), "per_class_recall": recall, "n": m["n"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--text", action="append", default=[], help="NAME=dev.jsonl (text conversations)")
    parser.add_argument("--speech", action="append", default=[], help="NAME=dev.jsonl (speech sessions, audio inline)")
    parser.add_argument("--label-map", default="", help="OLD=NEW,... as merc train --label-map")
    args = parser.parse_args()
    result = run(args.bundle, named(args.text), named(args.speech), parse_label_map(args.label_map))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
