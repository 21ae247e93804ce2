"""The page's files are package data, served at / and /static/* with a self-only CSP (no browser needed)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.page import ASSETS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app())  # no lifespan: the page routes need no store or model


def test_index_and_assets_are_served_with_a_self_only_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "media-src 'self' blob:" in csp
    html = r.text
    for needle in ('name="video"', 'name="audio"', 'name="transcript"', 'id="model"', "data-timeline"):
        assert needle in html
    for src in re.findall(r'(?:src|href)="([^"]+)"', html):  # every asset is ours (or inline data:)
        assert src.startswith(("static/", "data:")) or src == "docs", src
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000


def test_unknown_static_files_are_404_problems(client):
    for path in ("/static/nope.js", "/static/index.html", "/static/..%2Fpage.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json"), path


def test_no_file_reaches_outside_the_origin():
    """Offline: nothing the page ships names another host."""
    for name in ASSETS:
        text = (resources.files("service.api") / "static" / name).read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name


def test_a_wheel_ships_the_page():
    """pyproject's package data names every file the page serves (a non-editable install has them)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["service.api"]
    for name in ASSETS:
        assert any(fnmatch.fnmatch(f"static/{name}", g) for g in globs), name
    assert sorted(p.name for p in (ROOT / "service" / "api" / "static").iterdir()) == sorted(ASSETS)
