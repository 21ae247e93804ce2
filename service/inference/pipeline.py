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
* :func:`transcribe_media` makes the conversation when no transcript comes (speech recognition,
  service.features.speech); the result's ``transcript`` says which: ``{"source": "supplied"}`` or
  ``{"source": "asr", "model": ..., "confidence": ...}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.common import MODALITIES
from models.data import Conversation, DataError, inline_features
from models.ensemble import feature_modality
from service.features.datasets import INLINE, text_vectors
from service.features.registry import extractor_for
from service.inference.predictor import Predictor, unusable_modalities
from service.media.decode import MediaError, Window, cut, decode_media, open_media

__all__ = [
    "STAGES",
    "FeatureSet",
    "MediaError",
    "MediaInput",
    "extract_features",
    "extract_features_many",
    "modality_report",
    "run_conversation",
    "score",
    "supplied_modalities",
    "transcribe_media",
]

STAGES = ("decode", "text", "audio", "face_detection", "face_cnn", "readings")
Features = dict[str, list[np.ndarray | None]]
log = logging.getLogger(__name__)


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


def _audio_job(jobs: list[tuple[int, Path, list[Window]]], entries, device, outs: list[Features], timings, errors):
    """Decode each file's audio, cut its windows, run openSMILE on all cuts of all files at once.

    ``entries``: output key ("audio", or "voice_reading" for the voice reading) -> feature-spec entry;
    identical entries are computed once. With "voice_reading", ``outs[k]["voice_speech"]`` gets the
    seconds of speech of each cut (service.inference.readings.speech_seconds).
    """
    try:
        cuts, owners = [], []
        for k, path, windows in jobs:
            decoded = decode_media(path, windows, want_audio=True)
            timings["decode"] += decoded.decode_seconds
            for key in entries:
                outs[k][key] = [None] * len(windows)
            if decoded.audio is not None:
                cuts += [cut(decoded.audio, s, e) for s, e in windows]
                owners += [(k, i) for i in range(len(windows))]
        started = time.perf_counter()
        done: dict[tuple[str, str], list] = {}
        for key, entry in entries.items():
            same = (entry["extractor"], entry["version"])
            if same not in done:
                done[same] = extractor_for("audio", entry, device).extract(cuts) if cuts else []
            for (k, i), vec in zip(owners, done[same], strict=True):
                outs[k][key][i] = vec
        timings["audio"] += time.perf_counter() - started
        if "voice_reading" in entries:
            from service.inference.readings import speech_seconds

            for k, _, windows in jobs:
                outs[k]["voice_speech"] = [0.0] * len(windows)
            for (k, i), signal in zip(owners, cuts, strict=True):
                outs[k]["voice_speech"][i] = speech_seconds(signal)
    except BaseException as e:  # re-raised in the caller's thread
        errors.append(e)


def _visual(jobs: list[tuple[int, Path, list[Window]]], entry, device, outs: list[Features], timings, key="visual"):
    """Decode each video into one shared :class:`VisualBatch` (detection batched across files).

    ``outs[k][key]`` gets the pooled vectors; ``outs[k]["face_reading"]`` the face readings per window
    when the extractor is ``mtcnn-pyemotion`` (its per-frame expression scores).
    """
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
    from service.inference.readings import face_readings

    for (k, session), vectors in zip(sessions, results, strict=True):
        if key != "face_reading":
            outs[k][key] = vectors
        if not extractor.r3d:
            outs[k]["face_reading"] = face_readings(session.chosen, [len(f) for f in session.faces])
    timings["face_detection"] += batch.detection_seconds
    timings["face_cnn"] += batch.cnn_seconds


MEDIA_KEYS = {"audio": "audio", "visual": "visual", "voice_reading": "audio", "face_reading": "visual"}
"""Output key of a media spec -> the modality it is computed from (the readings' own extractors)."""


def _media_jobs(convs, spec, medias) -> dict[str, list[tuple[int, Path, list[Window]]]]:
    """Per media modality, the (conversation, file, windows) to extract; DataError for uncuttable
    transcripts when the bundle needs that modality (readings alone skip such conversations)."""
    jobs: dict[str, list] = {"audio": [], "visual": []}
    for k, (conv, media) in enumerate(zip(convs, medias, strict=True)):
        if media is None or not (media.video or media.audio):
            continue
        try:
            windows = utterance_windows(conv)
        except DataError:
            if "audio" in spec or "visual" in spec:
                raise
            continue
        for m, path in (("audio", media.audio_source), ("visual", media.video)):
            if path is not None and any(MEDIA_KEYS[key] == m for key in spec):
                jobs[m].append((k, path, windows))
    return jobs


def _media_features(convs, spec, medias: Sequence[MediaInput | None], device: str, outs, timings) -> None:
    """Audio on a worker thread (openSMILE releases the GIL) while videos decode and faces are detected.

    ``spec`` keys: "audio", "visual" (the bundle's) and "voice_reading", "face_reading" (the readings').
    """
    jobs = _media_jobs(convs, spec, medias)
    errors: list[BaseException] = []
    worker = None
    audio_entries = {key: e for key, e in spec.items() if MEDIA_KEYS[key] == "audio"}
    if jobs["audio"] and audio_entries:
        args = (jobs["audio"], audio_entries, device, outs, timings, errors)
        worker = threading.Thread(target=_audio_job, args=args, name="merc-audio", daemon=True)
        worker.start()
    try:
        visual = spec.get("visual")
        if jobs["visual"] and visual:
            _visual(jobs["visual"], visual, device, outs, timings)
        shared = visual is not None and visual["extractor"] == "mtcnn-pyemotion"
        if jobs["visual"] and "face_reading" in spec and not shared:
            _visual(jobs["visual"], spec["face_reading"], device, outs, timings, key="face_reading")
    finally:
        if worker is not None:
            worker.join()
    if errors:
        raise errors[0]


class FeatureSet(dict):
    """modality -> one vector (D,) or None per utterance, plus the media ``readings`` of the utterances.

    ``readings``: per utterance ``{"face": ..., "voice": ...}`` (service.inference.readings), None when no
    readings were made (no media, or ``readings=False``); ``reading_models``: the top-level
    descriptions of the reading models that ran. Only the modality keys are features.
    """

    readings: list[dict[str, Any]] | None = None
    reading_models: dict[str, Any] | None = None


def extract_features_many(
    convs: Sequence[Conversation],
    spec: dict[str, dict],
    medias: Sequence[MediaInput | None] | None = None,
    device: str = "auto",
    readings: bool = True,
    first: Sequence[int] | None = None,
    future_known: bool = True,
) -> tuple[list[FeatureSet], dict[str, float]]:
    """Features of several conversations as one batch, and the batch's seconds per stage.

    Text is encoded in one call, openSMILE runs over every utterance cut of every file on one worker
    thread, faces are detected in frame batches that span files and embedded in one pass. Raises
    MediaError / DataError for the first unusable file or transcript (the whole batch fails).
    ``readings``: conversations with media also get face and voice readings (:class:`FeatureSet`),
    whatever ``spec`` names, computed in the same decode / detection / openSMILE passes.
    ``first[i]``: text of conversation i is computed from that utterance on (earlier ones are None and
    serve as context, e.g. an append); ``future_known`` False (a live chat) keeps later turns out of
    every context window.
    """
    medias = list(medias) if medias is not None else [None] * len(convs)
    timings = dict.fromkeys(STAGES, 0.0)
    outs: list[Features] = [{} for _ in convs]
    computed = {m: e for m, e in spec.items() if e.get("version") != INLINE}
    for m in set(spec) - set(computed):
        for conv, out in zip(convs, outs, strict=True):
            out[m] = inline_features(conv, m)
    for key in [k for k in computed if feature_modality(k) == "text"]:  # an ensemble's text~1 ... too
        started = time.perf_counter()
        vectors_per_conv = text_vectors(convs, computed[key], device, first=first, future_known=future_known)
        for out, vectors in zip(outs, vectors_per_conv, strict=True):
            out[key] = vectors
        timings["text"] += time.perf_counter() - started
    media_spec = {m: e for m, e in computed.items() if m in ("audio", "visual")}
    with_readings = readings and any(m is not None and (m.video or m.audio) for m in medias)
    reading_spec = _reading_spec() if with_readings else {}
    if media_spec or reading_spec:
        _media_features(convs, {**media_spec, **reading_spec}, medias, device, outs, timings)
    sets = []
    for conv, media, out in zip(convs, medias, outs, strict=True):
        for m in media_spec:
            out.setdefault(m, [None] * len(conv.utterances))
        fs = FeatureSet({m: out[m] for m in out if feature_modality(m) in MODALITIES})
        if with_readings and media is not None and (media.video or media.audio):
            started = time.perf_counter()
            fs.readings, fs.reading_models = _readings(conv, media, out, reading_spec)
            timings["readings"] += time.perf_counter() - started
        sets.append(fs)
    return sets, timings


def _reading_spec() -> dict[str, dict]:
    """The readings' extractor entries ("voice_reading", "face_reading") that this host can run."""
    from service.features.registry import make_spec
    from service.inference.readings import FACE_READING_OPTIONS, load_voice_model_or_none

    out = {}
    voice = load_voice_model_or_none()
    if voice is not None:
        out["voice_reading"] = voice.feature_entry
    try:
        out["face_reading"] = make_spec("visual", "mtcnn-pyemotion", FACE_READING_OPTIONS)
    except (ImportError, RuntimeError, OSError) as e:
        log.warning("face reading unavailable: %s", e)
    return out


def _readings(conv: Conversation, media: MediaInput, out: dict, reading_spec: dict) -> tuple[list, dict]:
    """Per utterance readings of one conversation and the descriptions of the models that made them."""
    from service.inference import readings as rd

    n = len(conv.utterances)
    face = voice = None
    described: dict[str, Any] = {}
    if media.video is not None and "face_reading" in reading_spec:
        face = out.get("face_reading") or [None] * n
        described["face"] = rd.face_description()
    if media.audio_source is not None and "voice_reading" in reading_spec:
        model = rd.load_voice_model_or_none()
        vectors = out.get("voice_reading") or [None] * n
        speech = out.get("voice_speech") or [0.0] * n
        voice = rd.voice_readings(model, vectors, [u.speaker for u in conv.utterances], speech)
        described["voice"] = rd.voice_description(model)
    return rd.merge(face, voice, n), described


def extract_features(
    conv: Conversation,
    spec: dict[str, dict],
    media: MediaInput | None = None,
    device: str = "auto",
    readings: bool = True,
    first: int = 0,
    future_known: bool = True,
) -> tuple[FeatureSet, dict[str, float]]:
    """Features per modality of ``spec`` (None = absent for that utterance) and seconds per stage.

    Inline entries read ``utterance.features``; audio/visual without media are absent everywhere.
    With media (and ``readings``), the result also carries the face / voice readings (:class:`FeatureSet`).
    Raises MediaError for unusable media, DataError for a transcript that cannot be cut.
    ``first`` > 0: only utterances from ``first`` on get text features (the others are their context).
    """
    outs, timings = extract_features_many(
        [conv], spec, [media], device, readings=readings, first=[first], future_known=future_known
    )
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
    predictor: Predictor,
    conv: Conversation,
    features: Features,
    supplied: Sequence[str],
    timings: dict[str, float],
    transcript: dict[str, Any] | None = None,
    future_known: bool = True,
) -> dict[str, Any]:
    """The result document of a conversation whose features are known (``timings`` gain "predict").

    ``transcript`` says where the text came from (:func:`transcribe_media`'s entry; default supplied).
    ``future_known``: whether text context windows could include later turns (False for appends).
    """
    started = time.perf_counter()
    utterances = predictor.predict(conv, bundle_inputs(predictor, conv, features))
    timings = {**timings, "predict": time.perf_counter() - started}
    result = {
        "model": predictor.name,
        "labels": list(predictor.labels),
        "utterances": utterances,
        "modalities": modality_report(predictor, conv, supplied, utterances),
        "transcript": transcript or SUPPLIED,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    context = text_context(predictor.feature_spec.get("text"), future_known)
    if context is not None:
        result["text_context"] = context
    if getattr(features, "readings", None) is not None:  # beside the fused distribution, never instead
        from service.inference.readings import attach

        attach(result, features.readings, features.reading_models or {})
    return result


def text_context(entry: dict[str, Any] | None, future_known: bool = True) -> dict[str, Any] | None:
    """The context window each utterance's text was encoded with (None: a context-free encoder)."""
    if not entry or "context" not in entry:
        return None
    window = entry["context"]
    future = int(window.get("future", 0)) if future_known else 0
    past, speaker = int(window["past"]), bool(window["speaker"])
    out = {"encoder": entry["extractor"], "past": past, "future": future, "speaker": speaker}
    if window.get("mode") == "conversation":  # each turn sees past .. past + chunk - 1 earlier turns
        out.update(mode="conversation", chunk=int(window["chunk"]))
        if window.get("windowed"):  # ... and attends to its past turns only
            out["windowed"] = True
    return out


def bundle_inputs(predictor: Predictor, conv: Conversation, features: Features) -> Features:
    """The features as the bundle takes them: speaker-normalised where its feature spec says so
    (``feature_spec[m]["normalise"]``, statistics in the bundle folder; see speaker_norm.py)."""
    if not any(e.get("normalise") for e in predictor.feature_spec.values()):
        return features
    from service.features.speaker_norm import cached_bundle_normalisers, speaker_normalised

    norms = cached_bundle_normalisers(predictor.feature_spec, predictor.path)
    return speaker_normalised(dict(features), [u.speaker for u in conv.utterances], norms)


SUPPLIED = {"source": "supplied"}


def transcribe_media(conv_id: str, media: MediaInput | None, device: str = "auto") -> tuple[Conversation, dict]:
    """A conversation made by speech recognition from the media's sound, and its ``transcript`` entry.

    The entry (see service.features.speech.Transcript.info) gains ``seconds``, the wall time of
    decoding, VAD, Whisper and speaker clustering. Raises MediaError (no sound, no speech),
    DataError (no media), SpeechModelMissing (faster-whisper or the model not installed).
    """
    from service.features.speech import transcribe_file, transcript_conversation

    if media is None or media.audio_source is None:
        raise DataError(f"{conv_id}: no transcript and no media to transcribe")
    transcript = transcribe_file(media.audio_source, device)
    info = {**transcript.info(), "seconds": sum(transcript.seconds.values())}
    return transcript_conversation(conv_id, transcript), info


def run_conversation(
    predictor: Predictor,
    conv: Conversation | None,
    media: MediaInput | None = None,
    device: str = "auto",
    conv_id: str = "conversation",
) -> dict[str, Any]:
    """Features, prediction and per-modality report for one conversation (what ``merc predict`` prints).

    ``conv=None``: no transcript; the media's speech is transcribed first (:func:`transcribe_media`).
    """
    started = time.perf_counter()
    transcript, asr_seconds = None, {}
    if conv is None:
        conv, transcript = transcribe_media(conv_id, media, device)
        asr_seconds = {"asr": transcript.pop("seconds")}
    supplied = supplied_modalities(conv, media)
    features, timings = extract_features(conv, predictor.feature_spec, media, device)
    result = score(predictor, conv, features, supplied, {**asr_seconds, **timings}, transcript)
    result["timings"]["total"] = round(time.perf_counter() - started, 4)
    return result
