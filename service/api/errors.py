"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Besides ``type``, ``title``, ``status`` and ``detail``, a problem about the request body
names the offending field twice: ``field`` (``utterances[2].end``) and ``pointer``
(the JSON pointer ``/utterances/2/end``). A request the job store cannot serve (Redis gone,
stopped or loading) is answered 503 ``store-unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import metrics
from service.jobs.redis_store import UNAVAILABLE

log = logging.getLogger("merc.api")
PROBLEM_JSON = "application/problem+json"
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error answered as problem+json; ``field`` is a dotted path like ``utterances[2].end``."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        field: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail, self.field = status, slug, detail, field
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": f"urn:merc:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            out["instance"] = instance
        if self.field:
            out["field"] = self.field
            out["pointer"] = field_to_pointer(self.field)
        return {**out, **self.extra}


def field_path(loc: Sequence[str | int]) -> str:
    """('utterances', 2, 'end') -> 'utterances[2].end'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_to_pointer(field: str) -> str:
    """'transcript.utterances[2].end' -> '/transcript/utterances/2/end'."""
    parts = field.replace("[", ".").replace("]", "").split(".")
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts if p)


def validation_problem(errors: Sequence[Any], prefix: Sequence[str | int] = ()) -> Problem:
    """A 422 naming the first invalid field, with every error listed."""
    listed = []
    for e in errors:
        loc = [p for p in e["loc"] if p not in ("body", "query", "path", "header", "[key]")]
        field = field_path([*prefix, *loc]) or "body"
        listed.append({"field": field, "pointer": field_to_pointer(field), "detail": e["msg"]})
    first = listed[0] if listed else {"field": "body", "detail": "invalid request"}
    return Problem(422, "invalid-request", f"{first['field']}: {first['detail']}", field=first["field"], errors=listed)


RETRY_AFTER_S = 5  # Retry-After of a 503 while the job store (Redis) is unreachable


def store_unavailable(exc: Exception) -> Problem:
    """The 503 of a request the job store could not serve (Redis gone, stopped or loading)."""
    detail = f"the job store (Redis) is unreachable ({type(exc).__name__}); retry in a few seconds"
    return Problem(503, "store-unavailable", detail, headers={"Retry-After": str(RETRY_AFTER_S)})


MAX_INSTANCE = 200  # characters of the request path echoed as ``instance`` (a 100 kB path is not echoed)


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    if problem.status < 500:
        metrics.REJECTED.labels(problem.slug).inc()
    instance = request.url.path if request else None
    if instance and len(instance) > MAX_INSTANCE:
        instance = instance[:MAX_INSTANCE] + "..."
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app accepts on the request's path (HEAD with GET)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if route.matches({**request.scope, "method": method})[0] == Match.FULL:
                methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Answer every error, including framework ones, as problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            msg = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return problem_response(Problem(400, "malformed-json", f"the body is not valid JSON ({msg})"), request)
        return problem_response(validation_problem(errors), request)

    @app.exception_handler(ValidationError)
    async def _invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of every route on this path, not just the first route's
            headers["Allow"] = ", ".join(allowed_methods(request))
        detail = str(exc.detail)[:MAX_INSTANCE]
        return problem_response(Problem(exc.status_code, slug, detail, headers=headers), request)

    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unreachable on %s %s: %r", request.method, request.url.path, exc)
        return problem_response(store_unavailable(exc), request)

    for unavailable in UNAVAILABLE:
        app.add_exception_handler(unavailable, _store_down)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal", f"{type(exc).__name__}: the server failed"), request)
