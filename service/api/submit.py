"""Turning a validated request into a queued job, and a job into its JSON representation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.api import catalogue
from service.api.catalogue import BundleInfo, CatalogueError
from service.api.errors import Problem, validation_problem
from service.api.schemas import ConversationIn, UtteranceIn
from service.jobs.callbacks import callback_problem
from service.jobs.store import JobStore
from service.settings import Settings

DURATION_TOLERANCE = 0.1  # seconds a transcript may run past the media's end (container rounding)
MAX_FEATURE_ABS = 1e6  # inline feature values beyond this overflow the models' input standardisation


def bundle_names(settings: Settings) -> list[str]:
    return catalogue.bundle_names(settings.weights_dir)


def resolve_model(name: str | None, settings: Settings, field: str = "model", media: bool = False) -> BundleInfo:
    """The bundle a request asks for (or the default for a request with or without ``media``: see
    catalogue.default_bundle), from its manifest; 422 naming ``field`` if unknown."""
    s = settings
    name = name or catalogue.default_bundle(s.default_model, s.default_media_model, s.weights_dir, media)
    available = bundle_names(settings)
    if not catalogue.NAME.match(name) or name not in available:
        raise Problem(422, "unknown-model", f"no model {name!r}; available: {', '.join(available)}", field=field)
    try:
        return catalogue.bundle_info(name, settings.weights_dir)
    except CatalogueError as e:
        raise Problem(422, "unusable-model", f"model {name!r} cannot be used: {e}", field=field) from e


def parse_transcript(raw: bytes, prefix: str = "transcript") -> ConversationIn:
    """A multipart transcript (JSON) -> ConversationIn; errors name ``transcript.<field>``."""
    try:
        return ConversationIn.model_validate_json(raw)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise Problem(422, "malformed-transcript", f"{prefix}: not valid JSON", field=prefix) from None
        raise validation_problem(e.errors(), (prefix,)) from None


def check_utterances(
    utts: list[UtteranceIn],
    settings: Settings,
    *,
    where: str = "utterances",
    duration: float | None = None,
    media: bool = False,
    taken_ids: set[str] | None = None,
) -> None:
    """Limits and contradictions pydantic cannot see: count, text size, ids, times vs the media."""
    if len(utts) > settings.max_utterances:
        raise Problem(
            422, "too-many-utterances", f"{len(utts)} utterances (limit {settings.max_utterances})", field=where
        )
    seen = dict.fromkeys(taken_ids or (), -1)
    for i, u in enumerate(utts):
        at = f"{where}[{i}]"
        if u.text is not None and len(u.text) > settings.max_text_chars:
            raise Problem(
                422, "text-too-long", f"{len(u.text)} characters (limit {settings.max_text_chars})", field=f"{at}.text"
            )
        if u.id is not None:
            if u.id in seen:
                other = "an earlier utterance" if seen[u.id] < 0 else f"{where}[{seen[u.id]}]"
                raise Problem(422, "duplicate-id", f"id {u.id!r} is already used by {other}", field=f"{at}.id")
            seen[u.id] = i
        _check_times(u, at, duration, media)


def _check_times(u: UtteranceIn, at: str, duration: float | None, media: bool) -> None:
    if u.start is not None and u.end is not None and u.end <= u.start:
        raise Problem(422, "end-before-start", f"end {u.end} is not after start {u.start}", field=f"{at}.end")
    if media and (u.start is None or u.end is None):
        missing = "start" if u.start is None else "end"
        raise Problem(422, "missing-time", "start and end are required when media is uploaded", field=f"{at}.{missing}")
    if duration is None:
        return
    for name in ("start", "end"):
        value = getattr(u, name)
        if value is not None and value > duration + DURATION_TOLERANCE:
            detail = f"{value} s is after the end of the media ({duration:.2f} s)"
            raise Problem(422, "time-outside-media", detail, field=f"{at}.{name}")


def check_features(utts: list[UtteranceIn], predictor: BundleInfo, where: str = "utterances") -> None:
    """Inline vectors must have the size the bundle was trained on, and values a model can take."""
    for i, u in enumerate(utts):
        for m, vec in (u.features or {}).items():
            entry = predictor.feature_spec.get(m)
            if entry is not None and entry["version"] == "inline" and len(vec) != int(entry["dim"]):
                detail = f"{len(vec)} values; model {predictor.name!r} expects {entry['dim']}"
                raise Problem(422, "feature-size", detail, field=f"{where}[{i}].features.{m}")
            big = next((j for j, v in enumerate(vec) if abs(v) > MAX_FEATURE_ABS), None)
            if big is not None:
                detail = f"value {vec[big]:g} at position {big} is outside [-{MAX_FEATURE_ABS:g}, {MAX_FEATURE_ABS:g}]"
                raise Problem(422, "feature-out-of-range", detail, field=f"{where}[{i}].features.{m}")


def check_callback(url: object | None, settings: Settings) -> None:
    """422 naming callback_url when the finished job may not be POSTed there (see service.jobs.callbacks)."""
    if url is None:
        return
    reason = callback_problem(str(url), settings.callback_allow_private)
    if reason:
        raise Problem(422, "callback-not-allowed", reason, field="callback_url")


def check_something_to_score(utts: list[UtteranceIn], has_media: bool, where: str = "utterances") -> None:
    if has_media or any((u.text and u.text.strip()) or u.features for u in utts):
        return
    raise Problem(422, "nothing-to-score", "no utterance has text, features or media", field=where)


def untranscribed() -> ConversationIn:
    """The stand-in conversation of a media upload without transcript (one placeholder turn, never stored)."""
    return ConversationIn(utterances=[UtteranceIn(speaker="unknown")])


def check_transcribable(media: dict[str, dict[str, Any]]) -> None:
    """Without a transcript the upload needs sound to transcribe; 422 naming ``transcript`` otherwise."""
    if not media:
        detail = "a transcript is required without media (speech recognition needs a video or audio upload)"
        raise Problem(422, "transcript-required", detail, field="transcript")
    if not any(m.get("has_audio") for m in media.values()):
        detail = "no transcript and no sound to transcribe: the upload has no audio stream; send a transcript"
        raise Problem(422, "nothing-to-transcribe", detail, field="transcript")


def create_job(
    store: JobStore,
    conv: ConversationIn,
    predictor: BundleInfo,
    media: dict[str, dict[str, Any]],
    files: dict[str, Path],
    transcribe: bool = False,
) -> str:
    """Write jobs/<id>/ (request.json, media moved in under sniffed names) and queue the job.

    ``transcribe``: no transcript came (``conv`` is :func:`untranscribed`); the worker makes one
    by speech recognition and writes it into request.json before scoring.
    """
    job_id = store.new_id()
    job_dir = store.job_dir(job_id)
    job_dir.mkdir(parents=True)
    try:
        for name, info in media.items():
            info["file"] = f"{name}.{info['format']}"
            shutil.move(files[name], job_dir / info["file"])
        raw = conv.model_dump(mode="json", exclude={"model", "callback_url"}, exclude_none=True)
        raw["id"] = conv.id or job_id
        request = {"conversation": raw, "model": predictor.name, "media": media}
        if transcribe:
            raw["utterances"], request["transcribe"] = [], True
        (job_dir / "request.json").write_text(json.dumps(request))
        kind = "media" if media else "text"
        callback = str(conv.callback_url) if conv.callback_url else None
        store.create(job_id, predictor.name, kind, 0 if transcribe else len(conv.utterances), callback)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job_id


def job_json(store: JobStore, job: dict[str, Any]) -> dict[str, Any]:
    """The JobOut document of a store row."""
    media: dict[str, Any] = {}
    request: dict[str, Any] = {}
    try:
        request = json.loads((store.job_dir(job["id"]) / "request.json").read_text())
        media = {k: {f: v for f, v in d.items() if f != "file"} for k, d in request.get("media", {}).items()}
    except (OSError, ValueError):
        pass
    keys = ("id", "status", "model", "created_at", "updated_at", "attempts", "n_utterances", "result", "error")
    path = f"/v1/conversations/{job['id']}"
    out = {**{k: job[k] for k in keys}, "media": media, "links": {"self": path, "utterances": f"{path}/utterances"}}
    if job.get("result") and request.get("transcript", {}).get("source") == "asr" and not job["n_utterances"]:
        out["n_utterances"] = len(job["result"]["utterances"])  # counted at upload (0) before recognition ran
    return out
