"""Liveness, readiness and Prometheus metrics (outside /v1, no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service import metrics
from service.api.deps import SettingsDep, StoreDep, WorkerDep
from service.api.errors import Problem
from service.worker import loaded_models

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the default model is loaded and the worker is alive")
def readyz(settings: SettingsDep, store: StoreDep, worker: WorkerDep) -> dict:
    loaded = loaded_models()
    checks = {
        "default_model_loaded": settings.default_model in loaded,
        "worker_alive": worker is None or worker.alive(),
    }
    if not all(checks.values()):
        failing = ", ".join(k for k, ok in checks.items() if not ok)
        raise Problem(503, "not-ready", f"not ready: {failing}", checks=checks)
    worker_state = "external" if worker is None else f"{worker.n_threads} thread(s)"
    return {"status": "ready", "models": loaded, "worker": worker_state, "queue": store.depth(), "checks": checks}


@router.get("/metrics", summary="Prometheus metrics")
def prometheus() -> Response:
    metrics.MODELS_LOADED.set(len(loaded_models()))
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
