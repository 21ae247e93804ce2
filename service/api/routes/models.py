"""GET /v1/models: the bundles under MERC_WEIGHTS_DIR."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.api.catalogue import CatalogueError, bundle_info, bundle_names
from service.api.deps import SettingsDep, require_api_key
from service.api.schemas import ModelsOut
from service.licences import bundle_terms

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(require_api_key)],
    responses={401: {"description": "missing or bad API key", "content": {"application/problem+json": {}}}},
)


def describe(name: str, manifest: dict[str, Any], default: str, loaded: list[str]) -> dict[str, Any]:
    """What a client needs to choose a bundle, read from its manifest (without loading weights)."""
    metrics = manifest.get("dev_metrics") or {}
    return {
        "name": name,
        "architecture": manifest["architecture"],
        "labels": list(manifest["labels"]),
        "modalities": list(manifest.get("modalities") or manifest["feature_spec"]),
        "feature_spec": manifest["feature_spec"],
        "dev_metrics": {k: metrics.get(k) for k in ("accuracy", "weighted_f1", "macro_f1")},
        "dataset": (manifest.get("dataset") or {}).get("name"),
        **bundle_terms(manifest),
        "default": name == default,
        "loaded": name in loaded,
    }


@router.get("", response_model=ModelsOut, summary="Bundles available to the `model` field")
def list_models(request: Request, settings: SettingsDep) -> dict[str, Any]:
    worker = getattr(request.app.state, "worker", None)
    loaded = worker.loaded_models() if worker is not None else []
    out = []
    for name in bundle_names(settings.weights_dir):
        try:
            out.append(describe(name, bundle_info(name, settings.weights_dir).manifest, settings.default_model, loaded))
        except CatalogueError:
            continue
    return {"default": settings.default_model, "models": out}
