"""Which bundle a request that names none gets: MERC_DEFAULT_MEDIA_MODEL for media, MERC_DEFAULT_MODEL otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from service.api.catalogue import default_bundle


def bundle(weights: Path, name: str) -> None:
    (weights / name).mkdir(parents=True)
    (weights / name / "manifest.json").write_text(json.dumps({"name": name}))


def test_media_requests_get_the_media_bundle_when_it_is_there(tmp_path: Path) -> None:
    bundle(tmp_path, "text-one")
    assert default_bundle("text-one", "fused", tmp_path, media=True) == "text-one"  # not installed: the default
    bundle(tmp_path, "fused")
    assert default_bundle("text-one", "fused", tmp_path, media=True) == "fused"
    assert default_bundle("text-one", "fused", tmp_path, media=False) == "text-one"
    assert default_bundle("text-one", "", tmp_path, media=True) == "text-one"  # '' turns it off
