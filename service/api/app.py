"""The FastAPI application factory (``create_app``) used by ``merc serve`` and the tests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import metrics
from service.api import errors
from service.api.routes import conversations, health, page
from service.api.routes import models as models_route
from service.api.schemas import AppendIn, ConversationIn
from service.api.waiter import JobWaiter
from service.jobs.callbacks import Deliverer
from service.jobs.celery_app import LostJobs, get_queue_settings, open_store
from service.jobs.retention import start_sweeper
from service.jobs.worker import CALLBACK_HOOKS, FINISH_HOOKS, InProcessWorker
from service.settings import Settings, get_settings

log = logging.getLogger("merc.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store, re-queue interrupted jobs, start the worker, the sweeper and callback delivery.

    No model is loaded here: the API validates from manifests (service.api.catalogue); models live
    in the inference children of the in-process worker, or in the workers of distributed mode.
    """
    settings: Settings = app.state.settings
    qs = get_queue_settings()
    store = open_store(settings, api=True)  # Redis + Celery dispatch when MERC_QUEUE is set
    swept = store.sweep_tmp()
    if swept:
        log.warning("removed %d uploads left in tmp/ by an earlier crash", len(swept))
    start_sweeper(store, qs.retention_s, qs.sweep_interval_s)
    recovered = store.recover(settings.max_attempts)
    if any(recovered.values()):
        log.warning("interrupted jobs: %s", recovered)
    metrics.watch_queue(store.depth)
    distributed = qs.queue is not None
    if distributed:  # jobs of dead workers go back to the queue within seconds
        LostJobs(store, settings.max_attempts, 3 * qs.heartbeat_s).start(qs.heartbeat_s)
    worker = InProcessWorker(store, settings, settings.workers) if settings.workers and not distributed else None
    if worker is not None:
        worker.start()
    deliverer = Deliverer(store, settings.callback_timeout_s, settings.callback_allow_private).start()
    waiter = JobWaiter(asyncio.get_running_loop())
    FINISH_HOOKS.append(waiter.finished)
    CALLBACK_HOOKS.append(deliverer.notify)
    app.state.store, app.state.worker, app.state.waiter = store, worker, waiter
    app.state.distributed = distributed
    try:
        yield
    finally:
        FINISH_HOOKS.remove(waiter.finished)
        CALLBACK_HOOKS.remove(deliverer.notify)
        deliverer.stop()
        if worker is not None:
            worker.stop()


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class MetricsMiddleware:
    """Counts requests and observes latency per route template (pure ASGI)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # bounded labels: known methods (else "other"), route templates (else "unmatched")
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            metrics.REQUESTS.labels(method, route, str(status)).inc()
            metrics.LATENCY.labels(method, route).observe(time.perf_counter() - started)


class RelativeRedirects:
    """Redirects (the trailing-slash 307s) point at a path, never at the client's Host header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_relative(message: dict) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                message["headers"] = [
                    (k, _path_only(v) if k.lower() == b"location" else v) for k, v in message.get("headers", [])
                ]
            await send(message)

        await self.app(scope, receive, send_relative)


def _path_only(location: bytes) -> bytes:
    parts = urlsplit(location.decode("latin-1"))
    return urlunsplit(("", "", parts.path or "/", parts.query, "")).encode("latin-1")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with the hand-parsed request bodies (JSON and multipart) documented."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ConversationIn, AppendIn):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured app; the store, models and worker start with its lifespan."""
    app = FastAPI(
        title="merc",
        version="1.0",
        description="Per-utterance emotion distributions for conversations (text, audio, video).",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_settings()
    errors.install(app)
    app.include_router(conversations.router)
    app.include_router(models_route.router)
    app.include_router(health.router)
    app.include_router(page.router)  # the page at / (service/api/static)
    app.add_middleware(RelativeRedirects)
    app.add_middleware(MetricsMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
