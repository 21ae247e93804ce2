"""Liveness, readiness and Prometheus metrics (outside /v1, no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response

from service import metrics
from service.api import catalogue
from service.api.deps import SettingsDep, StoreDep, WorkerDep
from service.api.errors import Problem, store_unavailable
from service.jobs.redis_store import UNAVAILABLE
from service.settings import Settings

router = APIRouter(tags=["health"])
_NOT_READY = {
    503: {"description": "not ready (the failing checks are named)", "content": {"application/problem+json": {}}}
}


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: a worker can run jobs (its default model loaded, or a live distributed worker)",
    responses=_NOT_READY,
)
async def readyz(request: Request, settings: SettingsDep, store: StoreDep, worker: WorkerDep) -> dict[str, Any]:
    """Single process: the in-process worker runs and its child loaded the default model
    (MERC_WORKERS=0 is never ready). Distributed: at least one worker's heartbeat is live.
    Both: MERC_DEFAULT_MODEL is a usable bundle of the catalogue (else every request naming
    no model would be refused)."""
    unusable = default_model_problem(settings)
    if getattr(request.app.state, "distributed", False):
        try:
            live = await run_in_threadpool(store.live_workers)
        except UNAVAILABLE as e:
            checks = {"store_reachable": False, "default_model_available": unusable is None}
            why = store_unavailable(e)
            raise Problem(503, "not-ready", f"not ready: {why.detail}", headers=why.headers, checks=checks) from None
        checks = {"workers_alive": bool(live), "default_model_available": unusable is None}
        loaded, worker_state = [], f"{len(live)} distributed worker(s)"
    else:
        loaded = worker.loaded_models() if worker is not None else []
        checks = {
            "worker_alive": worker is not None and worker.alive(),
            "default_model_available": unusable is None,
            "default_model_loaded": settings.default_model in loaded,
        }
        worker_state = f"{worker.n_threads} thread(s)" if worker is not None else "none (MERC_WORKERS=0)"
    if not all(checks.values()):
        failing = ", ".join(k for k, ok in checks.items() if not ok)
        why = f" ({unusable})" if unusable else ""
        raise Problem(503, "not-ready", f"not ready: {failing}{why}", checks=checks)
    depth = await run_in_threadpool(store.depth)
    return {"status": "ready", "models": loaded, "worker": worker_state, "queue": depth, "checks": checks}


def default_model_problem(settings: Settings) -> str | None:
    """Why MERC_DEFAULT_MODEL cannot serve requests (not in the catalogue, unusable manifest), or None."""
    try:
        catalogue.bundle_info(settings.default_model, settings.weights_dir)
    except catalogue.CatalogueError as e:
        available = ", ".join(catalogue.bundle_names(settings.weights_dir)) or "none"
        return f"MERC_DEFAULT_MODEL {settings.default_model!r} is not usable: {e}; available: {available}"
    return None


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {metrics.CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}},
)
def prometheus(request: Request) -> Response:
    worker = getattr(request.app.state, "worker", None)
    metrics.MODELS_LOADED.set(len(worker.loaded_models()) if worker is not None else 0)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
