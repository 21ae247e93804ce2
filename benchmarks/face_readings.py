"""The face reading measured on the real faces here, and packaged alternatives on the same faces.

Run through ``benchmarks/readings_cremad.py --faces`` (docs/readings.md, "Face reading, measured")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readings_cremad.py --faces [--markdown]

Faces: every decoded frame of the six CREMA-D clips (actor 1001, six emotions, labels.csv) and one frame
in two of the unlabelled face media (WolfgangLanger_Pexels.mp4, single_face.mp4, astronaut.png,
multi_face.jpg). Each frame goes through the service's own face path: MTCNN at a 240 px short side (the
batched detector), the most confident face, eye-aligned square crop (margin 1.1) from the frame at up to
480 px, grayscale, resized to each candidate's input side. The candidates (benchmarks/face_candidates.py)
all see those same crops, so differences are the classifiers', not the detectors'.

Figures per candidate: frame accuracy on CREMA-D (all frames, six classes; surprise is a wrong answer),
per-class frame recall and its mean (UAR over the six), clip accuracy with the service's pooling (mean of
per-frame probabilities over one frame in ten, as ``frame_every=10`` samples them), the same over all
frames, and on the unlabelled media the share of frames per top emotion and the agreement with PyEmotion.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.face_candidates import LABELS, Candidate, load_candidates
from service.features.face_models import load_batched_mtcnn
from service.features.visual import THRESHOLDS, aligned_crop
from service.media.decode import FrameSampling, decode_media

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
CREMA_LABELS = {"anger": "anger", "disgust": "disgust", "fear": "fear", "happiness": "happiness",
                "neutral": "neutral", "sadness": "sadness"}  # fmt: skip
UNLABELLED = ("WolfgangLanger_Pexels.mp4", "single_face.mp4", "astronaut.png", "multi_face.jpg")
ANNOTATED = {"WolfgangLanger_Pexels.mp4": (("sadness", 0.0, 6.0), ("happiness", 11.0, 19.7))}
"""Segments labelled here by eye (one annotator; the file has no labels): crying 0-6 s, laughing 11 s to the end;
6-11 s (hand over the mouth, turning to a smile) is left out."""


@dataclass
class FaceCrops:
    """Aligned gray crops of one file's frames with a face: side -> (N, side, side) float32 in [0, 1]."""

    name: str
    frames: int
    crops: dict[int, np.ndarray]
    times: np.ndarray  # (N,) seconds of each crop's frame (0 for an image)


def _frames(path: Path, every: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(B, H, W, 3) RGB at 240 px, (B, H2, W2) gray at up to 480 px of ``path`` (an image: one frame), and
    the seconds between two of those frames."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        image = Image.open(path).convert("RGB")
        scale = 240 / min(image.size)
        small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        big_scale = min(1.0, 480 / min(image.size))
        big = image.convert("L").resize((round(image.width * big_scale), round(image.height * big_scale)))
        return np.asarray(small)[None], np.asarray(big)[None], 0.0
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        step = every / float(stream.average_rate or stream.guessed_rate)
    rgb, gray = [], []

    def sink(frames: np.ndarray, owners: list[list[int]], crops: np.ndarray | None) -> None:
        rgb.extend(frames)
        gray.extend(crops)

    decode_media(path, [(0.0, None)], want_audio=False, sink=sink,
                 sampling=FrameSampling(every, 240, 32, crop_side=480, crop_format="gray"))  # fmt: skip
    return np.stack(rgb), np.stack(gray), step


def face_crops(path: Path, every: int, sides: set[int]) -> FaceCrops:
    """The most confident MTCNN face of each frame, aligned and cut at every side in ``sides``."""
    detector = load_batched_mtcnn(torch.device("cpu"), 24, THRESHOLDS)
    rgb, gray, step = _frames(path, every)
    out: dict[int, list[np.ndarray]] = {s: [] for s in sides}
    times: list[float] = []
    for start in range(0, len(rgb), 16):
        found = detector.detect(rgb[start : start + 16])
        for k, (frame, faces) in enumerate(zip(gray[start : start + 16], found, strict=True)):
            if not len(faces.probs):
                continue
            times.append((start + k) * step)
            sx, sy = frame.shape[1] / rgb.shape[2], frame.shape[0] / rgb.shape[1]
            box, eyes = faces.boxes[0].astype(np.float64), faces.points[0][:2].astype(np.float64)
            image = Image.fromarray(frame)
            for s in sides:
                crop = aligned_crop(image, box * [sx, sy, sx, sy], eyes * [sx, sy], s)
                out[s].append(crop.astype(np.float32) / 255.0)
    crops = {s: np.stack(v) if v else np.zeros((0, s, s), np.float32) for s, v in out.items()}
    return FaceCrops(path.name, len(rgb), crops, np.array(times))


def _score(c: Candidate, crops: FaceCrops) -> np.ndarray:
    x = crops.crops[c.side]
    return np.concatenate([c.score(x[i : i + 64]) for i in range(0, len(x), 64)]) if len(x) else np.zeros((0, 7))


def cremad_table(cands: list[Candidate], clips: list[tuple[str, FaceCrops]]) -> list[str]:
    """Markdown rows: per candidate, frame accuracy, per-class recall, UAR, clip accuracy (1 in 10, all)."""
    present = sorted(set(CREMA_LABELS.values()), key=LABELS.index)
    head = "| model | frames right | " + " | ".join(present) + " | frame UAR | clips (1 in 10) | clips (all) |"
    rows = [head, "|" + "---|" * (len(present) + 5)]
    for c in cands:
        hits, total, clip10, clip_all, recall = 0, 0, 0, 0, []
        per_class: dict[str, tuple[int, int]] = {}
        for gold, crops in clips:
            probs = _score(c, crops)
            top = probs.argmax(1) if len(probs) else np.zeros(0, int)
            right = int((top == LABELS.index(gold)).sum())
            hits, total = hits + right, total + len(top)
            per_class[gold] = (right, len(top))
            clip10 += bool(len(probs)) and int(probs[::10].mean(0).argmax()) == LABELS.index(gold)
            clip_all += bool(len(probs)) and int(probs.mean(0).argmax()) == LABELS.index(gold)
        for label in present:
            r, n = per_class.get(label, (0, 0))
            recall.append(100.0 * r / max(n, 1))
        cells = " | ".join(f"{v:.0f}" for v in recall)
        rows.append(f"| {c.name} | {hits}/{total} ({100 * hits / max(total, 1):.1f} %) | {cells} | "
                    f"{np.mean(recall):.1f} | {clip10}/{len(clips)} | {clip_all}/{len(clips)} |")  # fmt: skip
    return rows


def unlabelled_table(cands: list[Candidate], media: list[FaceCrops]) -> list[str]:
    """Markdown rows: per file and candidate, faces found, top emotions' shares, agreement with the first."""
    rows = ["| file | faces / frames | model | top emotions (share of frames) | agrees with " + cands[0].name + " |",
            "|---|---|---|---|---|"]  # fmt: skip
    for crops in media:
        base = _score(cands[0], crops).argmax(1)
        for c in cands:
            top = _score(c, crops).argmax(1)
            counts = Counter(LABELS[i] for i in top).most_common(3)
            shares = ", ".join(f"{k} {100 * v / max(len(top), 1):.0f} %" for k, v in counts) or "—"
            agree = f"{100 * float((top == base).mean()):.0f} %" if len(top) else "—"
            found = f"{len(top)}/{crops.frames}"
            rows.append(f"| {crops.name} | {found} | {c.name} | {shares} | {agree} |")
    return rows


def annotated_table(cands: list[Candidate], media: list[FaceCrops]) -> list[str]:
    """Markdown rows: per candidate, frames right in each segment of :data:`ANNOTATED`, and the segment's
    pooled reading (mean of its frames' probabilities)."""
    segments = [(c, seg) for c in media for seg in ANNOTATED.get(c.name, ())]
    head = " | ".join(f"{c.name.split('_')[0]} {lab} {a:g}-{b:g} s" for c, (lab, a, b) in segments)
    rows = [f"| model | {head} |", "|---|" + "---|" * len(segments)]
    for cand in cands:
        cells = []
        for crops, (label, a, b) in segments:
            inside = (crops.times >= a) & (crops.times < b)
            probs = _score(cand, crops)[inside]
            right = int((probs.argmax(1) == LABELS.index(label)).sum())
            pooled = LABELS[int(probs.mean(0).argmax())] if len(probs) else "—"
            cells.append(f"{right}/{len(probs)} frames, pooled: {pooled}")
        rows.append(f"| {cand.name} | " + " | ".join(cells) + " |")
    return rows


def main(markdown: bool, names: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    cands, skipped = load_candidates(names)
    sides = {c.side for c in cands}
    rows = list(csv.DictReader((MEDIA / "cremad" / "labels.csv").open()))
    clips = [(CREMA_LABELS[r["emotion"]], face_crops(MEDIA / "cremad" / r["file"], 1, sides)) for r in rows]
    media = [face_crops(MEDIA / name, 2, sides) for name in UNLABELLED if (MEDIA / name).exists()]
    lines = ["CREMA-D actor 1001, every frame, most confident face (chance: 1 in 7 labels, 6 present)", "",
             *cremad_table(cands, clips), "", "Segments annotated here by eye (one frame in two)", "",
             *annotated_table(cands, media), "", "Unlabelled face media (one frame in two)", "",
             *unlabelled_table(cands, media)]  # fmt: skip
    lines += ["", *(f"skipped {k}: {v}" for k, v in skipped.items())] if skipped else []
    lines += ["", *(f"{c.name}: {c.note}" for c in cands)]
    print("\n".join(lines) if markdown else "\n".join(line.replace("|", " ") for line in lines))
