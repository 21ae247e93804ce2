"""The bundle catalogue: what the API knows about models, read from ``weights/*/manifest.json`` alone.

The API validates requests (model names, inline feature sizes, labels for the docs) from
manifests and never loads weights or imports torch: that is the workers' job
(``service.jobs.runner``). Manifests are re-read when their file changes.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # the same name as models.bundle.MANIFEST (which imports torch)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REQUIRED = ("architecture", "config", "labels", "feature_spec")


class CatalogueError(ValueError):
    """A bundle name that is unknown, malformed, or whose manifest is unusable; the message says why."""


@dataclass(frozen=True)
class BundleInfo:
    """A bundle as its manifest describes it: enough to validate a request for it."""

    name: str
    architecture: str
    labels: list[str]
    modalities: list[str]
    feature_spec: dict[str, dict[str, Any]]
    manifest: dict[str, Any] = field(repr=False)


def bundle_names(weights_dir: str | Path) -> list[str]:
    """Names of the folders under ``weights_dir`` holding a manifest."""
    return sorted(p.parent.name for p in Path(weights_dir).glob(f"*/{MANIFEST}"))


def default_bundle(default_model: str, default_media_model: str, weights_dir: str | Path, media: bool) -> str:
    """The bundle of a request that names none: ``default_media_model`` for a request with media when
    that bundle is in ``weights_dir`` (MERC_DEFAULT_MEDIA_MODEL), else ``default_model``."""
    if media and default_media_model and default_media_model in bundle_names(weights_dir):
        return default_media_model
    return default_model


_CACHE: dict[Path, tuple[float, BundleInfo]] = {}
_LOCK = threading.Lock()


def bundle_info(name: str, weights_dir: str | Path) -> BundleInfo:
    """The manifest of bundle ``name`` (cached until the file changes); CatalogueError if unusable."""
    if not NAME.match(name):
        raise CatalogueError(f"{name!r} is not a bundle name")
    path = Path(weights_dir) / name / MANIFEST
    try:
        mtime = path.stat().st_mtime
    except OSError:
        raise CatalogueError(f"no bundle {name!r}") from None
    with _LOCK:
        cached = _CACHE.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CatalogueError(f"bundle {name!r}: unreadable manifest ({type(e).__name__})") from None
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing or not isinstance(manifest.get("feature_spec"), dict):
        raise CatalogueError(f"bundle {name!r}: manifest lacks {', '.join(missing) or 'a feature_spec object'}")
    info = BundleInfo(
        name=name,
        architecture=str(manifest["architecture"]),
        labels=[str(x) for x in manifest["labels"]],
        modalities=list(manifest.get("modalities") or manifest["feature_spec"]),
        feature_spec=manifest["feature_spec"],
        manifest=manifest,
    )
    with _LOCK:
        _CACHE[path] = (mtime, info)
    return info
