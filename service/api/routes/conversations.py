"""POST/GET/DELETE /v1/conversations, POST /v1/conversations/{id}/utterances and GET of one append."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.api import submit
from service.api.deps import QueueRoom, SettingsDep, StoreDep, WorkerDep, require_api_key
from service.api.errors import Problem, validation_problem
from service.api.media import inspect_media
from service.api.multipart import FormParts, read_form
from service.api.schemas import AppendIn, AppendJob, AppendOut, ConversationIn, JobOut
from service.jobs.redis_store import UNAVAILABLE
from service.jobs.store import FAILED, SUCCEEDED, Busy, JobStore
from service.jobs.worker import APPEND, create_append, error_status
from service.settings import Settings

BodyT = TypeVar("BodyT", bound=BaseModel)
router = APIRouter(prefix="/v1/conversations", tags=["conversations"], dependencies=[Depends(require_api_key)])
JobId = Annotated[UUID, PathParam(description="the id returned by POST /v1/conversations")]
AppendId = Annotated[UUID, PathParam(description="the append_id of POST /v1/conversations/{job_id}/utterances")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": what, "content": {"application/problem+json": {}}}
    for code, what in {
        400: "malformed body",
        401: "missing or bad API key",
        404: "unknown conversation",
        409: "conversation not finished",
        413: "upload or media too large",
        415: "unsupported content",
        422: "invalid field (named in `field` and `pointer`)",
        429: "queue full",
    }.items()
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ConversationIn"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "video": {"type": "string", "format": "binary"},
                        "audio": {"type": "string", "format": "binary"},
                        "transcript": {"type": "string", "format": "binary", "description": "ConversationIn as JSON"},
                        "model": {"type": "string"},
                        "callback_url": {"type": "string", "format": "uri"},
                    },
                    "required": ["transcript"],
                }
            },
        },
    }
}


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes while it streams in."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "body-too-large", f"the body is larger than {limit} bytes", field="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Problem(413, "body-too-large", f"the body is larger than {limit} bytes", field="body")
    return bytes(body)


def parse_body(model: type[BodyT], body: bytes) -> BodyT:
    """A JSON body as ``model``: 400 if it is not JSON, 422 naming the first invalid field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise Problem(400, "malformed-json", "the body is not valid JSON", field="body") from None
        raise validation_problem(e.errors()) from None


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    dependencies=[QueueRoom],
    openapi_extra=_BODY,
    responses={200: {"model": JobOut, "description": "finished within ?wait"}, **_ERRORS},
    summary="Recognise emotions in a conversation (JSON text turns, or multipart media + transcript)",
)
async def create_conversation(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    worker: WorkerDep,
    wait: Annotated[float | None, Query(ge=0, description="seconds to wait for the result before 202")] = None,
) -> JSONResponse:
    """200 with the result when the job finishes within ``wait`` seconds, else 202 and a Location to poll.

    ``wait`` defaults to MERC_TEXT_WAIT_S for JSON bodies and 0 for media; media longer
    than MERC_SYNC_MEDIA_MAX_S is always answered 202.
    """
    if wait is not None and wait > settings.max_wait_s:
        raise Problem(422, "invalid-request", f"wait: at most {settings.max_wait_s:g} seconds", field="wait")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        job_id, media = await _submit_multipart(request, settings, store)
    elif content_type in ("application/json", ""):
        job_id, media = await _submit_json(request, settings, store), {}
    else:
        detail = f"Content-Type {content_type!r}: send application/json or multipart/form-data"
        raise Problem(415, "unsupported-content-type", detail, field="Content-Type")
    if worker is not None:
        worker.notify()
    if wait is None:
        wait = 0.0 if media else settings.text_wait_s
    if any((m.get("duration") or 0) > settings.sync_media_max_s for m in media.values()):
        wait = 0.0
    location = {"Location": job_json_path(job_id)}
    try:
        status = await request.app.state.waiter.wait(store, job_id, min(wait, settings.max_wait_s))
        job = await run_in_threadpool(store.get, job_id)
    except UNAVAILABLE:  # the job is stored (accepted): the client polls it, never sends it again
        body = {"id": job_id, "status": "queued", "links": {"self": location["Location"]}}
        return JSONResponse(body, status_code=202, headers=location)
    code = 200 if status in (SUCCEEDED, FAILED) else 202
    return JSONResponse(submit.job_json(store, job), status_code=code, headers=location)


def job_json_path(job_id: str) -> str:
    return f"/v1/conversations/{job_id}"


async def _submit_json(request: Request, settings: Settings, store: JobStore) -> str:
    conv = parse_body(ConversationIn, await read_json_body(request, settings.max_transcript_kb * 1024))
    submit.check_utterances(conv.utterances, settings)
    predictor = submit.resolve_model(conv.model, settings)
    await run_in_threadpool(submit.check_callback, conv.callback_url, settings)  # may resolve a host name
    submit.check_features(conv.utterances, predictor)
    submit.check_something_to_score(conv.utterances, has_media=False)
    return await run_in_threadpool(submit.create_job, store, conv, predictor, {}, {})


async def _submit_multipart(request: Request, settings: Settings, store: JobStore) -> tuple[str, dict]:
    limits = {"transcript": settings.max_transcript_kb * 1024, "model": 200, "callback_url": 2048}
    declared = request.headers.get("content-length", "")
    most = 2 * settings.max_upload_bytes + sum(limits.values()) + 65536  # two files, the fields, part headers
    if declared.isdigit() and int(declared) > most:
        raise Problem(413, "upload-too-large", f"the request declares {declared} bytes (limit {most})", field="body")
    parts = await read_form(request, store.tmp_dir, settings.max_upload_bytes, limits)
    try:
        return await run_in_threadpool(_validate_multipart, parts, settings, store)
    finally:
        parts.cleanup()  # files moved into the job folder are gone already


def _validate_multipart(parts: FormParts, settings: Settings, store: JobStore) -> tuple[str, dict]:
    transcribe = "transcript" not in parts.fields  # the worker transcribes the media (speech recognition)
    media = {
        name: inspect_media(path, name, settings.probe_timeout_s, settings.max_media_seconds, settings.max_video_pixels)
        for name, path in parts.files.items()
    }
    if transcribe:
        submit.check_transcribable(media)
    conv = submit.untranscribed() if transcribe else submit.parse_transcript(parts.fields["transcript"])
    durations = [m["duration"] for m in media.values() if m["duration"] is not None]
    duration = min(durations) if durations else None
    where = "transcript.utterances"
    if not transcribe:
        submit.check_utterances(conv.utterances, settings, where=where, duration=duration, media=bool(media))
    for name in ("model", "callback_url"):
        if name in parts.fields:
            value = parts.fields[name].decode("utf-8", "replace").strip()
            try:
                conv = ConversationIn.model_validate({**conv.model_dump(), name: value or None})
            except ValidationError as e:
                raise validation_problem(e.errors()) from None
    predictor = submit.resolve_model(conv.model, settings, media=bool(media))
    submit.check_callback(conv.callback_url, settings)
    submit.check_features(conv.utterances, predictor, where)
    submit.check_something_to_score(conv.utterances, bool(media), where)
    return submit.create_job(store, conv, predictor, media, parts.files, transcribe), media


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS, summary="Status and, when done, the result")
def get_conversation(job_id: JobId, store: StoreDep) -> JSONResponse:
    return JSONResponse(submit.job_json(store, _conversation(store, str(job_id))))


def _conversation(store: JobStore, job_id: str) -> dict[str, Any]:
    """The conversation job ``job_id``; 404 if unknown (append jobs are internal)."""
    job = store.get(job_id)
    if job is None or job["kind"] == APPEND:
        raise Problem(404, "unknown-conversation", f"no conversation {job_id}", field="job_id")
    return job


@router.delete("/{job_id}", status_code=204, responses=_ERRORS, summary="Delete media, features and result")
def delete_conversation(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Response:
    """Waits for an append in progress (the conversation's lease), then removes every copy."""
    _conversation(store, str(job_id))
    try:
        with store.lock(f"conversation:{job_id}", ttl_s=60, wait_s=min(30.0, settings.job_timeout_s)):
            deleted = store.delete(str(job_id))
    except Busy:
        raise Problem(
            409, "conversation-busy", "an append to this conversation is still running", field="job_id"
        ) from None
    if not deleted:
        raise Problem(404, "unknown-conversation", f"no conversation {job_id}", field="job_id")
    return Response(status_code=204)


@router.post(
    "/{job_id}/utterances",
    response_model=AppendOut,
    dependencies=[QueueRoom],
    responses={
        202: {"model": AppendJob, "description": "still running after ?wait: poll Location (links.self)"},
        **_ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AppendIn"}}},
        }
    },
    summary="Append text turns; returns the new utterances scored in context",
)
async def append(
    job_id: JobId,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    worker: WorkerDep,
    wait: Annotated[float | None, Query(ge=0, description="seconds to wait for the scores before 202")] = None,
) -> JSONResponse:
    """Earlier utterances keep their stored features; the new turns are scored by a worker, in context.

    Ids and the duplicate check are decided by the worker under the conversation's lock, so
    parallel appends (from any number of API processes) keep every turn exactly once. Still
    queued or running after ``wait``: 202 with the append job (Location, ``links.self``) to poll,
    which ends succeeded with the new turns or failed with the reason.
    """
    if wait is not None and wait > settings.max_wait_s:
        raise Problem(422, "invalid-request", f"wait: at most {settings.max_wait_s:g} seconds", field="wait")
    new = parse_body(AppendIn, await read_json_body(request, settings.max_transcript_kb * 1024))
    append_id = await run_in_threadpool(_queue_append, str(job_id), new, settings, store)
    if worker is not None:
        worker.notify()
    wait = settings.text_wait_s if wait is None else wait
    try:
        status = await request.app.state.waiter.wait(store, append_id, min(wait, settings.max_wait_s))
        job = await run_in_threadpool(store.get, append_id)
    except UNAVAILABLE:  # the append is stored (accepted): the client polls it, never sends it again
        status, job = None, None
    if job is None or status not in (SUCCEEDED, FAILED):  # the client polls the append job itself
        body = append_json(str(job_id), job or _pending(append_id, len(new.utterances)))
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})
    if status == FAILED:
        error = job["error"] or {}
        extra = {k: v for k, v in error.items() if k not in ("type", "title", "status", "detail", "field", "pointer")}
        slug = str(error.get("type", "urn:merc:problem:job-internal")).rsplit(":", 1)[-1]
        code = error_status(error)
        raise Problem(code, slug, error.get("detail", "the append failed"), field=error.get("field"), **extra)
    return JSONResponse({"id": str(job_id), **job["result"]})


@router.get(
    "/{job_id}/utterances/{append_id}",
    response_model=AppendJob,
    responses=_ERRORS,
    summary="Status of one append: queued, running, the new turns scored, or why it failed",
)
def get_append(job_id: JobId, append_id: AppendId, store: StoreDep) -> JSONResponse:
    """The append job ``append_id`` of conversation ``job_id`` (404 once the conversation is deleted)."""
    conv_id = str(job_id)
    _conversation(store, conv_id)
    job = store.get(str(append_id))
    if job is None or job["kind"] != APPEND or append_conversation(store, job["id"]) != conv_id:
        raise Problem(404, "unknown-append", f"no append {append_id} to conversation {conv_id}", field="append_id")
    return JSONResponse(append_json(conv_id, job))


def append_conversation(store: JobStore, append_id: str) -> str | None:
    """The conversation an append job adds turns to (from its request.json), or None if unreadable."""
    try:
        return str(json.loads((store.job_dir(append_id) / "request.json").read_text())["conversation_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def append_json(conv_id: str, job: dict[str, Any]) -> dict[str, Any]:
    """The AppendJob document of an append job's store row."""
    path = f"{job_json_path(conv_id)}/utterances/{job['id']}"
    keys = ("status", "created_at", "updated_at", "attempts", "n_utterances", "error")
    result = {"id": conv_id, **job["result"]} if job.get("result") and job["status"] == SUCCEEDED else None
    body = {"id": conv_id, "append_id": job["id"], **{k: job.get(k) for k in keys}, "result": result}
    return {**body, "links": {"self": path, "conversation": job_json_path(conv_id)}}


def _pending(append_id: str, n: int) -> dict[str, Any]:
    """A stand-in row for an append whose record could not be read back (it is queued)."""
    now = time.time()
    return {"id": append_id, "status": "queued", "created_at": now, "updated_at": now, "attempts": 0, "n_utterances": n}


def _queue_append(job_id: str, new: AppendIn, settings: Settings, store: JobStore) -> str:
    """Checks that need no lock (the conversation exists and succeeded, sizes), then an append job."""
    job = _conversation(store, job_id)
    if job["status"] != SUCCEEDED:
        detail = f"the conversation is {job['status']}; turns can be appended once it has succeeded"
        raise Problem(409, "not-finished", detail, field="job_id")
    if job["n_utterances"] + len(new.utterances) > settings.max_utterances:
        detail = f"the conversation would exceed {settings.max_utterances} utterances"
        raise Problem(422, "too-many-utterances", detail, field="utterances")
    submit.check_utterances(new.utterances, settings)
    bundle = submit.resolve_model(job["model"], settings)
    submit.check_features(new.utterances, bundle)
    submit.check_something_to_score(new.utterances, has_media=False)
    raw = [u.model_dump(exclude_none=True) for u in new.utterances]
    return create_append(store, job_id, bundle.name, raw)
