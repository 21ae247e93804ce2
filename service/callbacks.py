"""Where a finished job may be POSTed: ``callback_url`` checks against server-side request forgery.

A service exposed to a network must not let a client make it call its own internal
hosts (cloud metadata at 169.254.169.254, Redis on localhost, the LAN). Unless
``MERC_CALLBACK_ALLOW_PRIVATE`` is set (trusted networks, tests), a callback host must
resolve only to public addresses. The check runs when the job is submitted (a clear 422)
and again right before sending (the name may resolve differently by then).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast


def callback_problem(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not receive callbacks, or None when it may."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host"
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return f"host {parts.hostname!r} cannot be resolved ({e})"
    private = sorted({info[4][0] for info in infos if not _public(info[4][0])})
    if private:
        return (
            f"host {parts.hostname!r} resolves to non-public address(es) {', '.join(private)}; "
            "set MERC_CALLBACK_ALLOW_PRIVATE=true on trusted networks"
        )
    return None
