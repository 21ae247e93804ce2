"""Face and voice readings on the six CREMA-D clips of ../shared/media/cremad (docs/readings.md).

Each clip (FLV: VP6 video, MP3 audio; actor 1001 saying "Don't forget a jacket." with six emotions)
goes through the media pipeline as its own one-utterance conversation (service.inference.pipeline, readings
on, no bundle features), so its voice is normalised with the shrinkage fallback for a speaker with
one utterance. The last column treats the six clips as one conversation of one speaker (what a
service sees when a speaker talks several times): the voice model then normalises over all six.
Nothing here is tuned to these clips. Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readings_cremad.py [--markdown]

``--faces`` measures the face reading instead, on every frame of these clips and on the unlabelled
face media, beside the packaged alternatives that are installed (benchmarks/face_readings.py)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readings_cremad.py --faces [--models pyemotion,fer-minixception]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.data import Conversation, Utterance  # noqa: E402
from service.features.voice_reading import load_voice_model  # noqa: E402
from service.features.voice_training import TO_MELD7, map_label  # noqa: E402
from service.inference.pipeline import MediaInput, extract_features  # noqa: E402

CREMAD = ROOT.parent / "shared" / "media" / "cremad"


def top(reading: dict | None) -> str:
    if not reading:
        return "—"
    return f"{reading['emotion']} {reading['distribution'][reading['emotion']]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--faces", action="store_true", help="face models on every frame (benchmarks/face_readings.py)")
    ap.add_argument("--models", default=None, help="with --faces: comma-separated candidates (default: all)")
    args = ap.parse_args()
    if args.faces:
        from benchmarks.face_readings import main as faces_main

        faces_main(args.markdown, args.models.split(",") if args.models else None)
        return
    torch.set_num_threads(1)
    rows = list(csv.DictReader((CREMAD / "labels.csv").open()))
    voice = load_voice_model()
    per_clip, vectors = [], []
    for row in rows:
        conv = Conversation(row["file"], [Utterance("u0", row["actor"], row["text"])])
        feats, _ = extract_features(conv, {}, MediaInput(video=CREMAD / row["file"]), "cpu")
        per_clip.append(feats.readings[0])
        spec = {"audio": voice.feature_entry}
        audio, _ = extract_features(conv, spec, MediaInput(video=CREMAD / row["file"]), "cpu", readings=False)
        vectors.append(audio["audio"][0])
    together = voice.predict(vectors, [r["actor"] for r in rows])
    hits = {"face": 0, "voice": 0, "session": 0}
    lines = ["| clip | gold | face (top, p) | frames | voice alone (top, p) | voice, six clips as one session |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row, r, p in zip(rows, per_clip, together, strict=True):
        session = voice.labels[int(p.argmax())] if p is not None else "—"
        face, vo = r.get("face"), r.get("voice")
        gold = map_label(row["emotion"], voice.labels, TO_MELD7)  # the voice model's name for it (happiness: joy)
        hits["face"] += bool(face and face["emotion"] == row["emotion"])
        hits["voice"] += bool(vo and vo["emotion"] == gold)
        hits["session"] += session == gold
        frames = f"{face['frames']}/{face['frames_sampled']}" if face else "0"
        sp = f"{session} {float(p.max()):.2f}" if p is not None else "—"
        lines.append(f"| {row['file']} | {row['emotion']} | {top(face)} | {frames} | {top(vo)} | {sp} |")
    n = len(rows)
    lines.append(f"| **correct** | | **{hits['face']}/{n}** | | **{hits['voice']}/{n}** | **{hits['session']}/{n}** |")
    print("\n".join(lines) if args.markdown else "\n".join(line.replace("|", " ") for line in lines))


if __name__ == "__main__":
    main()
