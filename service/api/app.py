"""The FastAPI application factory (``create_app``) used by ``merc serve`` and the tests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import metrics
from service.api import errors
from service.api.routes import conversations, health
from service.api.routes import models as models_route
from service.api.schemas import AppendIn, ConversationIn
from service.api.waiter import JobWaiter
from service.celery_app import get_queue_settings, open_store
from service.retention import start_sweeper
from service.settings import Settings, get_settings
from service.worker import FINISH_HOOKS, InProcessWorker, get_predictor, warm_up

log = logging.getLogger("merc.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store, re-queue interrupted jobs, load models once, start the worker."""
    settings: Settings = app.state.settings
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = open_store(settings, api=True)  # Redis + Celery dispatch when MERC_QUEUE is set
    start_sweeper(store, get_queue_settings().retention_s, get_queue_settings().sweep_interval_s)
    recovered = store.recover(settings.max_attempts)
    if any(recovered.values()):
        log.warning("interrupted jobs: %s", recovered)
    for name in dict.fromkeys([settings.default_model, *settings.preload]):
        warm_up(get_predictor(name, settings), settings)
    metrics.watch_queue(store.depth)
    distributed = get_queue_settings().queue is not None
    worker = InProcessWorker(store, settings, settings.workers) if settings.workers and not distributed else None
    if worker is not None:
        worker.start()
    waiter = JobWaiter(asyncio.get_running_loop())
    FINISH_HOOKS.append(waiter.finished)
    app.state.store, app.state.worker, app.state.waiter = store, worker, waiter
    try:
        yield
    finally:
        FINISH_HOOKS.remove(waiter.finished)
        if worker is not None:
            worker.stop()


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
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)


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
    app.add_middleware(MetricsMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
