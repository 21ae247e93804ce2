"""One conversation, end to end: transcript (+ media) -> per-utterance features -> bundle -> distributions.

The same code path serves ``merc predict``, ``merc extract`` and the service's workers:

* :func:`extract_features` computes what a feature spec names for one conversation: text with the
  batched sentence encoder, audio with openSMILE on each utterance's cut of the 16 kHz signal, visual
  with MTCNN + face CNN on frames sampled inside each utterance. Media utterances need ``start`` and
  ``end``; a conversation of one utterance without times uses the whole file (MELD's per-utterance
  clips). Audio is decoded first and its features computed on a worker thread while the video decodes
  and faces are detected (each stream is decoded once).
* :func:`extract_features_many` does the same for several conversations as one batch: one text
  encoder call, one openSMILE pass over all cuts, face detection batched across files, one face-CNN pass.
* :func:`score` adds the prediction and says per modality whether it was supplied, used, and why
  not (the result document of ``merc predict`` and of every job); :func:`run_conversation` is
  extraction plus scoring for one local conversation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.common import MODALITIES
from models.data import Conversation, DataError, inline_features
from service.datasets import INLINE, text_vectors
from service.features.registry import extractor_for
from service.media.decode import MediaError, Window, cut, decode_media, open_media
from service.predictor import Predictor, unusable_modalities

__all__ = [
    "STAGES",
    "MediaError",
    "MediaInput",
    "extract_features",
    "extract_features_many",
    "modality_report",
    "run_conversation",
    "score",
    "supplied_modalities",
]

STAGES = ("decode", "text", "audio", "face_detection", "face_cnn")
Features = dict[str, list[np.ndarray | None]]


@dataclass
class MediaInput:
    """The media of one conversation: a video (its audio track is used when no audio file is given) and/or audio."""

    video: Path | None = None
    audio: Path | None = None
    video_has_audio: bool | None = None  # None: not probed yet (supplied_modalities opens the video)

    @property
    def audio_source(self) -> Path | None:
        return self.audio or self.video


def utterance_windows(conv: Conversation) -> list[Window]:
    """(start, end) per utterance; DataError naming the utterance when times are missing."""
    if len(conv.utterances) == 1 and conv.utterances[0].start is None and conv.utterances[0].end is None:
        return [(0.0, None)]
    windows = []
    for i, u in enumerate(conv.utterances):
        if u.start is None or u.end is None:
            raise DataError(f"{conv.id}.utterances[{i}] ({u.id}): start and end (seconds) are needed to cut media")
        windows.append((u.start, u.end))
    return windows


def _audio_job(jobs: list[tuple[int, Path, list[Window]]], entry, device, outs: list[Features], timings, errors):
    """Decode each file's audio, cut its windows, run openSMILE on all cuts of all files at once."""
    try:
        cuts, owners = [], []
        for k, path, windows in jobs:
            decoded = decode_media(path, windows, want_audio=True)
            timings["decode"] += decoded.decode_seconds
            outs[k]["audio"] = [None] * len(windows)
            if decoded.audio is not None:
                cuts += [cut(decoded.audio, s, e) for s, e in windows]
                owners += [(k, i) for i in range(len(windows))]
        started = time.perf_counter()
        if cuts:
            vectors = extractor_for("audio", entry, device).extract(cuts)
            for (k, i), vec in zip(owners, vectors, strict=True):
                outs[k]["audio"][i] = vec
        timings["audio"] += time.perf_counter() - started
    except BaseException as e:  # re-raised in the caller's thread
        errors.append(e)


def _visual(jobs: list[tuple[int, Path, list[Window]]], entry, device, outs: list[Features], timings) -> None:
    """Decode each video into one shared :class:`VisualBatch` (detection batched across files)."""
    extractor = extractor_for("visual", entry, device)
    batch = extractor.batch()
    sessions = []
    try:
        for k, path, windows in jobs:
            session = batch.session(len(windows))
            decoded = decode_media(path, windows, want_audio=False, sink=session, sampling=extractor.sampling())
            timings["decode"] += decoded.decode_seconds
            sessions.append((k, session))
        results = batch.finish()
    finally:
        batch.close()
    for (k, _), vectors in zip(sessions, results, strict=True):
        outs[k]["visual"] = vectors
    timings["face_detection"] += batch.detection_seconds
    timings["face_cnn"] += batch.cnn_seconds


def _media_features(convs, spec, medias: Sequence[MediaInput | None], device: str, outs, timings) -> None:
    """Audio on a worker thread (openSMILE releases the GIL) while videos decode and faces are detected."""
    jobs = {m: [] for m in ("audio", "visual")}
    for k, (conv, media) in enumerate(zip(convs, medias, strict=True)):
        if media is None or not (media.video or media.audio):
            continue
        windows = utterance_windows(conv)
        for m, path in (("audio", media.audio_source), ("visual", media.video)):
            if m in spec and path is not None:
                jobs[m].append((k, path, windows))
    errors: list[BaseException] = []
    worker = None
    if jobs["audio"]:
        args = (jobs["audio"], spec["audio"], device, outs, timings, errors)
        worker = threading.Thread(target=_audio_job, args=args, name="merc-audio", daemon=True)
        worker.start()
    try:
        if jobs["visual"]:
            _visual(jobs["visual"], spec["visual"], device, outs, timings)
    finally:
        if worker is not None:
            worker.join()
    if errors:
        raise errors[0]


def extract_features_many(
    convs: Sequence[Conversation],
    spec: dict[str, dict],
    medias: Sequence[MediaInput | None] | None = None,
    device: str = "auto",
) -> tuple[list[Features], dict[str, float]]:
    """Features of several conversations as one batch, and the batch's seconds per stage.

    Text is encoded in one call, openSMILE runs over every utterance cut of every file on one worker
    thread, faces are detected in frame batches that span files and embedded in one pass. Raises
    MediaError / DataError for the first unusable file or transcript (the whole batch fails).
    """
    medias = list(medias) if medias is not None else [None] * len(convs)
    timings = dict.fromkeys(STAGES, 0.0)
    outs: list[Features] = [{} for _ in convs]
    computed = {m: e for m, e in spec.items() if e.get("version") != INLINE}
    for m in set(spec) - set(computed):
        for conv, out in zip(convs, outs, strict=True):
            out[m] = inline_features(conv, m)
    if "text" in computed:
        started = time.perf_counter()
        for out, vectors in zip(outs, text_vectors(convs, computed["text"], device), strict=True):
            out["text"] = vectors
        timings["text"] = time.perf_counter() - started
    media_spec = {m: e for m, e in computed.items() if m in ("audio", "visual")}
    if media_spec:
        _media_features(convs, media_spec, medias, device, outs, timings)
    for conv, out in zip(convs, outs, strict=True):
        for m in media_spec:
            out.setdefault(m, [None] * len(conv.utterances))
    return outs, timings


def extract_features(
    conv: Conversation, spec: dict[str, dict], media: MediaInput | None = None, device: str = "auto"
) -> tuple[Features, dict[str, float]]:
    """Features per modality of ``spec`` (None = absent for that utterance) and seconds per stage.

    Inline entries read ``utterance.features``; audio/visual without media are absent everywhere.
    Raises MediaError for unusable media, DataError for a transcript that cannot be cut.
    """
    outs, timings = extract_features_many([conv], spec, [media], device)
    return outs[0], timings


def supplied_modalities(conv: Conversation, media: MediaInput | None) -> list[str]:
    """Modalities the request brought: transcript text or inline vectors, an audio file or a video's sound, a video."""
    has_sound = bool(media and media.audio)
    if media and media.video and not has_sound:
        has_sound = media.video_has_audio
        if has_sound is None:
            with open_media(media.video) as container:
                has_sound = bool(container.streams.audio)
    given = {
        "text": any(u.text and u.text.strip() for u in conv.utterances),
        "audio": has_sound,
        "visual": bool(media and media.video),
    }
    return [m for m in MODALITIES if given[m] or any(m in u.features for u in conv.utterances)]


ABSENT_REASONS = {
    "text": "every text is empty",
    "audio": "silent or too short in every utterance",
    "visual": "no face found in any utterance",
}


def _inline_only_reason(predictor: Predictor, conv: Conversation, m: str) -> str | None:
    """Why media cannot stand in for ``m`` when the bundle was trained on precomputed (inline) vectors."""
    entry = predictor.feature_spec.get(m)
    if entry is None or entry["version"] != INLINE or any(m in u.features for u in conv.utterances):
        return None
    return (
        f"bundle {predictor.name!r} was trained on precomputed {entry['extractor']} {m} features "
        f"({entry['dim']}-d), which the media extractors here do not produce; send them inline "
        f"as utterances[].features.{m}"
    )


def modality_report(
    predictor: Predictor, conv: Conversation, supplied: Sequence[str], utts: list[dict]
) -> dict[str, dict]:
    """Per modality: supplied by the request, used by the bundle for some utterance, and why not."""
    not_in_bundle = unusable_modalities(predictor, supplied)
    used = {m for u in utts for m in u["modalities"]}
    report = {}
    for m in MODALITIES:
        reason = None
        if m in not_in_bundle:
            reason = not_in_bundle[m]
        elif m in supplied and m not in used:
            reason = _inline_only_reason(predictor, conv, m) or ABSENT_REASONS[m]
        elif m not in supplied and m in predictor.modalities:
            reason = "not supplied"
        report[m] = {"supplied": m in supplied, "used": m in used, "reason": reason}
    return report


def score(
    predictor: Predictor, conv: Conversation, features: Features, supplied: Sequence[str], timings: dict[str, float]
) -> dict[str, Any]:
    """The result document of a conversation whose features are known (``timings`` gain "predict")."""
    started = time.perf_counter()
    utterances = predictor.predict(conv, features)
    timings = {**timings, "predict": time.perf_counter() - started}
    return {
        "model": predictor.name,
        "labels": list(predictor.labels),
        "utterances": utterances,
        "modalities": modality_report(predictor, conv, supplied, utterances),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def run_conversation(
    predictor: Predictor, conv: Conversation, media: MediaInput | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Features, prediction and per-modality report for one conversation (what ``merc predict`` prints)."""
    started = time.perf_counter()
    supplied = supplied_modalities(conv, media)
    features, timings = extract_features(conv, predictor.feature_spec, media, device)
    result = score(predictor, conv, features, supplied, timings)
    result["timings"]["total"] = round(time.perf_counter() - started, 4)
    return result
