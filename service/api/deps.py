"""FastAPI dependencies: settings, the job store, the worker, and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.api.errors import Problem
from service.jobs.store import JobStore
from service.jobs.worker import InProcessWorker
from service.settings import Settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when MERC_API_KEYS is set")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_worker(request: Request) -> InProcessWorker | None:
    return request.app.state.worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
WorkerDep = Annotated[InProcessWorker | None, Depends(get_worker)]


def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    """401 unless API keys are off or ``X-API-Key`` is one of them (constant-time comparison)."""
    if not settings.api_keys:
        return
    if key is None:
        raise Problem(401, "missing-api-key", "send your API key in the X-API-Key header", field="X-API-Key")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
        raise Problem(401, "bad-api-key", "the X-API-Key header does not hold a valid key", field="X-API-Key")


def require_queue_room(settings: SettingsDep, store: StoreDep) -> None:
    """429 when queued + running jobs reach MERC_MAX_QUEUE (checked before reading any upload)."""
    pending = store.pending()
    if pending >= settings.max_queue:
        raise Problem(
            429,
            "queue-full",
            f"{pending} jobs are waiting or running (limit {settings.max_queue}); retry later",
            headers={"Retry-After": "5"},
        )


QueueRoom = Depends(require_queue_room)
