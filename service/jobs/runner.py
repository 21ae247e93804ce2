"""Inference for jobs: features and scores of one conversation, run inside the job's child process.

This is the only part of the job path that imports torch and loads bundles. It works on a
job's files (``jobs/<id>/request.json``, media, ``features.npz``) and returns results and
features to the job runner (``service.jobs.worker``), which owns the store, locks and
transitions. ``service.jobs.sandbox`` calls these functions in a child process it can kill when
a job runs past ``MERC_JOB_TIMEOUT_S``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from models.data import Conversation, parse_conversation
from models.ensemble import feature_modality
from service import metrics
from service.features.datasets import INLINE
from service.features.registry import extractor_for
from service.inference.pipeline import MediaInput, extract_features, supplied_modalities, transcribe_media
from service.inference.pipeline import score as pipeline_score
from service.inference.predictor import FeatureLists, Predictor
from service.jobs.files import load_features, save_features, write_json
from service.media.decode import MediaLimits, set_limits
from service.settings import Settings

log = logging.getLogger("merc.inference")

_PREDICTORS: dict[tuple[str, str, str], Predictor] = {}
_PREDICTOR_LOCK = threading.Lock()


class JobInputError(ValueError):
    """A job whose stored inputs cannot be processed (reported as the job's error)."""


def get_predictor(name: str, settings: Settings) -> Predictor:
    """The bundle ``name`` loaded once per process."""
    key = (name, str(settings.weights_dir), settings.device)
    with _PREDICTOR_LOCK:
        if key not in _PREDICTORS:
            started = time.perf_counter()
            _PREDICTORS[key] = Predictor(name, device=settings.device, weights_dir=settings.weights_dir)
            metrics.STAGE_SECONDS.labels("load_model").observe(time.perf_counter() - started)
        return _PREDICTORS[key]


def warm_up(predictor: Predictor, settings: Settings) -> None:
    """Load the extractors a bundle's feature spec names now, not on the first request."""
    for key, entry in predictor.feature_spec.items():
        if entry["version"] == INLINE:
            continue
        try:
            extractor = extractor_for(feature_modality(key), entry, settings.device)
        except ValueError as e:  # a spec this host cannot satisfy: jobs will report it per modality
            log.warning("bundle %s: %s", predictor.name, e)
            continue
        if hasattr(extractor, "load"):
            extractor.load()


def preload(settings: Settings) -> list[str]:
    """Load the default bundle and MERC_PRELOAD with their extractors; the names loaded."""
    for name in dict.fromkeys([settings.default_model, *settings.preload]):
        try:
            warm_up(get_predictor(name, settings), settings)
        except Exception:  # a missing bundle fails its jobs, with the reason, not the worker
            log.exception("could not load bundle %s", name)
    return loaded_models()


def loaded_models() -> list[str]:
    return sorted({key[0] for key in _PREDICTORS})


# ---------------------------------------------------------------- features and scoring


def score(
    predictor: Predictor,
    conv: Conversation,
    features: FeatureLists,
    media: MediaInput,
    timings: dict,
    transcript: dict | None = None,
    future_known: bool = True,
) -> dict:
    """The result document (see service.inference.pipeline.score); refuses non-finite probabilities."""
    supplied = supplied_modalities(conv, media)
    result = pipeline_score(predictor, conv, features, supplied, timings, transcript, future_known=future_known)
    check_finite(result)
    for stage, seconds in result["timings"].items():
        if seconds > 0:  # stages that did not run this time (no media) are not observed
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    return result


def check_finite(result: dict[str, Any]) -> None:
    """JobInputError when a distribution holds NaN or infinity (out-of-range inputs overflow the model)."""
    for u in result["utterances"]:
        if not all(math.isfinite(p) for p in u["distribution"].values()):
            raise JobInputError(
                f"the model produced non-finite probabilities for utterance {u['index']} ({u['id']}): "
                "its inputs are out of the range the bundle was trained on"
            )


def media_input(job_dir: Path, desc: dict[str, Any]) -> MediaInput:
    """The uploaded files of a job, as stored in its request.json ``media``."""
    return MediaInput(
        video=job_dir / desc["video"]["file"] if "video" in desc else None,
        audio=job_dir / desc["audio"]["file"] if "audio" in desc else None,
        video_has_audio=bool(desc.get("video", {}).get("has_audio")),
    )


def media_limits(settings: Settings) -> MediaLimits:
    """The decoding bounds of ``settings`` (MERC_MAX_VIDEO_PIXELS, MERC_MAX_MEDIA_SECONDS)."""
    return MediaLimits(max_pixels=settings.max_video_pixels, max_seconds=settings.max_media_seconds)


def read_request(job_dir: Path) -> dict[str, Any]:
    """A job's stored request.json."""
    try:
        return json.loads((job_dir / "request.json").read_text())
    except (OSError, ValueError) as e:
        raise JobInputError(f"job inputs are missing or unreadable ({type(e).__name__})") from None


# ---------------------------------------------------------------- the two kinds of work


def run_conversation_job(job_dir: str, model: str, settings: Settings) -> dict[str, Any]:
    """A whole conversation: {"result": the result document}; features.npz written for later appends."""
    folder = Path(job_dir)
    request = read_request(folder)
    set_limits(media_limits(settings))  # whatever the API checked, decoding here holds to the settings
    media = media_input(folder, request.get("media") or {})
    asr = transcribe_job(folder, request, media, settings.device)
    conv = parse_conversation(request["conversation"], "transcript")
    predictor = get_predictor(model, settings)
    features, timings = extract_features(
        conv, predictor.feature_spec, media if media.video or media.audio else None, settings.device
    )
    result = score(predictor, conv, features, media, {**asr, **timings}, request.get("transcript"))
    if folder.is_dir():
        save_features(folder / "features.npz", features, len(conv.utterances))
    return {"result": result}


def transcribe_job(folder: Path, request: dict[str, Any], media: MediaInput, device: str) -> dict[str, float]:
    """Speech recognition for a job that came without a transcript (``request["transcribe"]``).

    request.json gets the recognised utterances and the result's ``transcript`` entry, so that
    appends and retries see them; returns {"asr": seconds}, or {} when a transcript came.
    """
    if not request.get("transcribe"):
        return {}
    conv, info = transcribe_media(request["conversation"].get("id", folder.name), media, device)
    seconds = info.pop("seconds")
    keys = ("id", "speaker", "text", "start", "end")
    request["conversation"]["utterances"] = [{k: getattr(u, k) for k in keys} for u in conv.utterances]
    request["transcript"] = info
    del request["transcribe"]
    if folder.is_dir():
        write_json(folder / "request.json", request)
    return {"asr": seconds}


def run_append(job_dir: str, model: str, conversation: dict[str, Any], first: int, settings: Settings) -> dict:
    """New turns scored in the context of the old ones, whose stored features are reused.

    ``conversation`` holds the old turns (``< first``) followed by the new ones. Returns
    {"result": the whole conversation's result, "features": modality -> one vector or None
    per utterance}; the caller (holding the conversation's lock) writes them.
    """
    folder = Path(job_dir)
    request = read_request(folder)
    conv = parse_conversation(conversation, "utterances")
    media = media_input(folder, request.get("media") or {})
    predictor = get_predictor(model, settings)
    old = load_features(folder / "features.npz")
    fresh, timings = _extract_new(conv, predictor, first, settings)
    n = len(conv.utterances)
    features = {k: _pad(old.get(k), first) + (fresh.get(k) or [None] * n)[first:] for k in predictor.feature_keys}
    result = score(predictor, conv, features, media, timings, request.get("transcript"), future_known=False)
    return {"result": result, "features": features}


def prefetch_text(items: list[dict[str, Any]], settings: Settings) -> int:
    """The text of several queued jobs encoded in one call per text extractor; returns the turns asked for.

    ``items``: ``{"job_dir", "model"}`` for a conversation job, plus ``"append"`` (the new utterances)
    for an append to the conversation stored in ``job_dir``. The vectors land in the encoder's memory
    cache under the exact input they were computed from, so the jobs, run next, find them; an item
    whose inputs changed meanwhile, or cannot be read, simply misses. Media jobs awaiting speech
    recognition have no text yet and are left out."""
    from service.features.datasets import text_vectors

    groups: dict[tuple[str, bool], tuple[dict[str, Any], list[Conversation], list[int]]] = {}
    for item in items:
        try:
            request = read_request(Path(item["job_dir"]))
            if request.get("transcribe"):
                continue
            raw = request["conversation"]
            first = 0
            if "append" in item:
                old = raw["utterances"]
                raw, first = {**raw, "utterances": [*old, *item["append"]]}, len(old)
            conv = parse_conversation(raw, "utterances")
            spec = get_predictor(item["model"], settings).feature_spec
        except Exception:  # unreadable, invalid or deleted: the job itself reports it
            continue
        for name, entry in spec.items():  # an ensemble may read several text features
            if feature_modality(name) != "text" or entry["version"] == INLINE:
                continue
            key = (json.dumps(entry, sort_keys=True), "append" not in item)
            groups.setdefault(key, (entry, [], []))
            groups[key][1].append(conv)
            groups[key][2].append(first)
    n = 0
    for (_, future_known), (entry, convs, firsts) in groups.items():
        text_vectors(convs, entry, settings.device, first=firsts, future_known=future_known)
        n += sum(len(c.utterances) - f for c, f in zip(convs, firsts, strict=True))
    return n


def _pad(vectors: list | None, n: int) -> list:
    """The first ``n`` stored vectors (None where fewer were stored)."""
    vectors = list(vectors or [])[:n]
    return vectors + [None] * (n - len(vectors))


def _extract_new(conv: Conversation, predictor: Predictor, first: int, settings: Settings) -> tuple[dict, dict]:
    """Features of utterances ``first..`` with the earlier turns as their context (a live chat: no later
    turns in any window). Lists cover every utterance (None below ``first``)."""
    media = MediaInput()
    return extract_features(conv, predictor.feature_spec, media, settings.device, first=first, future_known=False)
