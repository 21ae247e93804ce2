"""Callbacks: where a finished job may be POSTed (SSRF checks), and delivery with retries.

A service exposed to a network must not let a client make it call its own internal
hosts (cloud metadata at 169.254.169.254, Redis on localhost, the LAN). Unless
``MERC_CALLBACK_ALLOW_PRIVATE`` is set (trusted networks, tests), a callback host must
resolve only to public addresses, IPv6 forms that embed an IPv4 address (IPv4-mapped and
-compatible, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) included. The check runs
when the job is submitted (a clear 422) and again right before sending, and the POST goes
to the very address that was checked (no second DNS lookup, so DNS rebinding cannot swap
in an internal address); the URL's host name still goes in ``Host`` and in TLS SNI, and
the certificate is verified against it.

Delivery goes through an outbox in the job store (``outbox_add`` when a job ends): the
``Deliverer`` thread of any API or worker process claims due entries, POSTs them, and on
failure retries with exponential backoff (1 s, 2 s, 4 s, ... up to ``max_attempts``). The
outbox is persisted, so a restart loses no callback; claims are leases, so several
deliverers never send one entry at the same time.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service import metrics

log = logging.getLogger("merc.callbacks")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_COMPAT = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        found += list(ip.teredo)
    if ip in _NAT64 or ip in _COMPAT:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(address: str) -> bool:
    """A global unicast address, and so is every IPv4 address embedded in it."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        return all(is_public(str(v4)) for v4 in embedded_ipv4(ip))
    return True


@dataclass(frozen=True)
class Target:
    """A checked callback destination: the URL parts and the one address to connect to."""

    scheme: str
    host: str
    port: int
    path: str
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host name."""
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.path}"


def resolve_target(url: str, allow_private: bool) -> tuple[Target | None, str | None]:
    """(the checked destination, None), or (None, why ``url`` may not receive callbacks)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None, f"{url!r} is not an http(s) URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        return None, f"host {parts.hostname!r} cannot be resolved ({e})"
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    private = sorted({a for a in addresses if not is_public(a)})
    if private and not allow_private:
        return None, (
            f"host {parts.hostname!r} resolves to non-public address(es) {', '.join(private)}; "
            "set MERC_CALLBACK_ALLOW_PRIVATE=true on trusted networks"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path, addresses[0].split("%", 1)[0]), None


def callback_problem(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not receive callbacks, or None when it may (on trusted networks, any http(s) URL)."""
    parts = urlsplit(url)
    if allow_private and parts.scheme in ("http", "https") and parts.hostname:
        return None
    return resolve_target(url, allow_private)[1]


def post_pinned(url: str, body: dict[str, Any], timeout: float, allow_private: bool) -> None:
    """POST ``body`` to ``url`` at the address checked just now; ValueError if refused, httpx errors."""
    import httpx

    target, reason = resolve_target(url, allow_private)
    if target is None:
        raise PermissionError(reason)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host and not target.host.startswith("["):
        host_header = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
    headers = {"Host": host_header, "User-Agent": "merc-callback/1"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}  # TLS checks the name
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        request = client.build_request("POST", target.pinned_url, json=body, headers=headers, extensions=extensions)
        client.send(request).raise_for_status()


def callback_body(job: dict[str, Any]) -> dict[str, Any]:
    """What a callback POSTs: the finished job's id, status, model, result and error."""
    return {k: job.get(k) for k in ("id", "status", "model", "result", "error")}


class Deliverer:
    """A daemon thread that sends the store's due callbacks, retrying with exponential backoff."""

    def __init__(
        self,
        store: Any,
        timeout_s: float = 5.0,
        allow_private: bool = False,
        max_attempts: int = 8,
        base_delay_s: float = 1.0,
        poll_s: float = 1.0,
    ) -> None:
        self.store, self.timeout_s, self.allow_private = store, timeout_s, allow_private
        self.max_attempts, self.base_delay_s, self.poll_s = max_attempts, base_delay_s, poll_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Deliverer:
        self._thread = threading.Thread(target=self._loop, name="merc-callbacks", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """A delivery was queued: look now, not at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the store away for a moment: try again next round
                log.warning("callback delivery round failed", exc_info=True)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def deliver_due(self) -> int:
        """Send every due callback once; returns how many were sent successfully."""
        sent = 0
        for item in self.store.outbox_claim(limit=16, lease_s=self.timeout_s * 2 + 5):
            sent += self.deliver(item)
        return sent

    def deliver(self, item: dict[str, Any]) -> bool:
        try:
            post_pinned(item["url"], item["body"], self.timeout_s, self.allow_private)
        except PermissionError as e:  # the host now resolves to a private address: never retried
            log.warning("callback for job %s not sent: %s", item["job_id"], e)
            metrics.CALLBACKS.labels("refused").inc()
            self.store.outbox_done(item["id"])
            return False
        except Exception as e:  # httpx errors, 4xx/5xx answers: retried with backoff
            self._retry(item, e)
            return False
        metrics.CALLBACKS.labels("ok").inc()
        self.store.outbox_done(item["id"])
        return True

    def _retry(self, item: dict[str, Any], error: Exception) -> None:
        attempts = int(item["attempts"])
        if attempts >= self.max_attempts:
            log.warning("callback for job %s dropped after %d attempts: %s", item["job_id"], attempts, error)
            metrics.CALLBACKS.labels("failed").inc()
            self.store.outbox_done(item["id"])
            return
        delay = self.base_delay_s * 2 ** (attempts - 1)
        log.info("callback for job %s failed (%s); retry %d in %.0f s", item["job_id"], error, attempts, delay)
        metrics.CALLBACKS.labels("retried").inc()
        self.store.outbox_retry(item["id"], time.time() + delay, str(error))
