"""One conversation, end to end: transcript (+ media) -> per-utterance features -> bundle -> distributions.

The same code path serves ``merc predict``, ``merc extract`` and the service's workers:

* :func:`extract_features` computes what a feature spec names for one conversation: text with the
  batched sentence encoder, audio with openSMILE on each utterance's cut of the 16 kHz signal, visual
  with MTCNN + face CNN on frames sampled inside each utterance. Media utterances need ``start`` and
  ``end``; a conversation of one utterance without times uses the whole file (MELD's per-utterance
  clips). Audio is decoded first and its features computed on a worker thread while the video decodes
  and faces are detected (each stream is decoded once).
* :func:`run_conversation` adds the prediction and says per modality whether it was supplied, used,
  and why not.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.common import MODALITIES
from models.data import Conversation, DataError, inline_features
from service.features.registry import extractor_for
from service.media.decode import MediaError, Window, cut, decode_media, open_media
from service.predictor import Predictor, unusable_modalities

__all__ = ["STAGES", "MediaError", "MediaInput", "extract_features", "run_conversation", "supplied_modalities"]

STAGES = ("decode", "text", "audio", "face_detection", "face_cnn")
INLINE = "inline"
Features = dict[str, list[np.ndarray | None]]


@dataclass
class MediaInput:
    """The media of one conversation: a video (its audio track is used when no audio file is given) and/or audio."""

    video: Path | None = None
    audio: Path | None = None

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


def _text(conv: Conversation, entry: dict[str, Any], device: str) -> list[np.ndarray | None]:
    encoder = extractor_for("text", entry, device)
    vectors, present = encoder.encode_with_mask([u.text for u in conv.utterances], show_progress=False)
    return [vec if ok else None for vec, ok in zip(vectors, present, strict=True)]


def _audio_job(path: Path, windows: list[Window], entry, device, out: Features, timings, errors) -> None:
    try:
        decoded = decode_media(path, windows, want_audio=True)
        timings["decode"] += decoded.decode_seconds
        started = time.perf_counter()
        if decoded.audio is None:
            out["audio"] = [None] * len(windows)
        else:
            extractor = extractor_for("audio", entry, device)
            out["audio"] = extractor.extract([cut(decoded.audio, s, e) for s, e in windows])
        timings["audio"] += time.perf_counter() - started
    except BaseException as e:  # re-raised in the caller's thread
        errors.append(e)


def _visual(path: Path, windows: list[Window], entry, device, timings) -> list[np.ndarray | None]:
    extractor = extractor_for("visual", entry, device)
    session = extractor.session(len(windows))
    decoded = decode_media(path, windows, want_audio=False, sink=session, sampling=extractor.sampling())
    vectors = session.finish()
    timings["decode"] += decoded.decode_seconds
    timings["face_detection"] += session.detection_seconds
    timings["face_cnn"] += session.cnn_seconds
    return vectors


def _media_features(conv, spec, media: MediaInput, device: str, out: Features, timings) -> None:
    windows = utterance_windows(conv)
    errors: list[BaseException] = []
    worker = None
    if "audio" in spec:
        if media.audio_source is None:
            out["audio"] = [None] * len(windows)
        else:
            args = (media.audio_source, windows, spec["audio"], device, out, timings, errors)
            worker = threading.Thread(target=_audio_job, args=args, name="merc-audio", daemon=True)
            worker.start()
    try:
        if "visual" in spec:
            no_video = [None] * len(windows)
            out["visual"] = _visual(media.video, windows, spec["visual"], device, timings) if media.video else no_video
    finally:
        if worker is not None:
            worker.join()
    if errors:
        raise errors[0]


def extract_features(
    conv: Conversation, spec: dict[str, dict], media: MediaInput | None = None, device: str = "auto"
) -> tuple[Features, dict[str, float]]:
    """Features per modality of ``spec`` (None = absent for that utterance) and seconds per stage.

    Inline entries read ``utterance.features``; audio/visual without media are absent everywhere.
    Raises MediaError for unusable media, DataError for a transcript that cannot be cut.
    """
    timings = dict.fromkeys(STAGES, 0.0)
    n = len(conv.utterances)
    out: Features = {}
    computed = {m: e for m, e in spec.items() if e.get("version") != INLINE}
    for m in set(spec) - set(computed):
        out[m] = inline_features(conv, m)
    if "text" in computed:
        started = time.perf_counter()
        out["text"] = _text(conv, computed["text"], device)
        timings["text"] = time.perf_counter() - started
    media_spec = {m: e for m, e in computed.items() if m in ("audio", "visual")}
    if media_spec and media is not None and (media.video or media.audio):
        _media_features(conv, media_spec, media, device, out, timings)
    for m in media_spec:
        out.setdefault(m, [None] * n)
    return out, timings


def supplied_modalities(conv: Conversation, media: MediaInput | None) -> dict[str, bool]:
    """Whether the request carries each modality: text in any utterance, an audio / a video stream."""
    streams = {"audio": False, "visual": False}
    for path, kinds in ((media and media.video, ("audio", "visual")), (media and media.audio, ("audio",))):
        if path:
            with open_media(path) as container:
                streams["audio"] |= "audio" in kinds and bool(container.streams.audio)
                streams["visual"] |= "visual" in kinds and bool(container.streams.video)
    return {"text": any(u.text and u.text.strip() for u in conv.utterances), **streams}


def _modality_report(predictor: Predictor, supplied: dict[str, bool], features: Features) -> dict[str, dict]:
    not_in_bundle = unusable_modalities(predictor, [m for m in MODALITIES if supplied[m]])
    report = {}
    for m in MODALITIES:
        used = m in predictor.modalities and any(v is not None for v in features.get(m, []))
        if used:
            reason = None
        elif not supplied[m]:
            reason = {"text": "no utterance has text", "audio": "no audio stream", "visual": "no video stream"}[m]
        elif m in not_in_bundle:
            reason = not_in_bundle[m]
        else:
            reason = {"text": "every text is empty", "audio": "silent or too short in every utterance"}.get(
                m, "no face found in any utterance"
            )
        report[m] = {"supplied": supplied[m], "used": used, "reason": reason}
    return report


def run_conversation(
    predictor: Predictor, conv: Conversation, media: MediaInput | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Features, prediction and per-modality report for one conversation (what ``merc predict`` prints)."""
    started = time.perf_counter()
    supplied = supplied_modalities(conv, media)
    features, timings = extract_features(conv, predictor.feature_spec, media, device)
    t0 = time.perf_counter()
    utterances = predictor.predict(conv, features)
    timings["fusion"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return {
        "model": predictor.name,
        "labels": list(predictor.labels),
        "utterances": utterances,
        "modalities": _modality_report(predictor, supplied, features),
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
