"""The page at ``/``: hand-written HTML, CSS and JS shipped as package files (no CDN, no build step).

The page talks to the API under ``/v1`` with relative URLs, so it also works behind a path prefix.
Its Content-Security-Policy allows nothing but this origin (plus ``blob:`` media for the local
preview of the chosen file), so it cannot load anything from elsewhere even by mistake.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response

from service.api.errors import Problem

router = APIRouter(include_in_schema=False)
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@cache
def asset(name: str) -> bytes:
    """The bytes of ``service/api/static/<name>`` (read once per process)."""
    return (resources.files("service.api") / "static" / name).read_bytes()


def _answer(name: str) -> Response:
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Response(asset(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=headers)


@router.get("/")
def index() -> Response:
    """The page: upload media or type turns, then see emotions along the conversation."""
    return _answer("index.html")


@router.get("/static/{name}")
def static(name: str) -> Response:
    """One of the page's own files; anything else is a 404 problem."""
    if name not in ASSETS or name == "index.html":
        raise Problem(404, "not-found", f"no static file {name!r}", field="name")
    return _answer(name)
