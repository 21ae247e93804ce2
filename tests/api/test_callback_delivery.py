"""Callbacks (issue 12, defect 7 and item 12): IPv6 forms embedding private IPv4 are refused, the
POST goes to the address that was checked, and delivery retries with backoff from a persisted
outbox, so a restart (a new store and deliverer on the same data) still delivers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from service.jobs.callbacks import Deliverer, callback_problem, is_public, resolve_target
from service.jobs.store import JobStore


@pytest.mark.parametrize(
    "url",
    [
        "http://[::7f00:1]/hook",  # IPv4-compatible 127.0.0.1
        "http://[::127.0.0.1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
        "http://[::ffff:169.254.169.254]/latest",
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/latest",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "http://[2002:c0a8:1::1]/hook",  # 6to4 of 192.168.0.1
        "http://[64:ff9b:1::1]/hook",  # local-use NAT64
    ],
)
def test_ipv6_forms_embedding_private_ipv4_are_refused(url: str) -> None:
    reason = callback_problem(url, allow_private=False)
    assert reason and "non-public" in reason, (url, reason)


def test_public_ipv6_and_embedded_public_ipv4_pass() -> None:
    assert is_public("2606:4700:4700::1111")
    assert is_public("64:ff9b::5db8:d70e")  # NAT64 of 93.184.215.14
    assert not is_public("::1") and not is_public("fe80::1")


class _Hook:
    """A local HTTP endpoint answering ``codes`` in turn (then 204), recording requests."""

    def __init__(self, codes: list[int]) -> None:
        self.codes, self.received = list(codes), []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hook.received.append((self.headers["host"], body, time.monotonic()))
                self.send_response(hook.codes.pop(0) if hook.codes else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_post_goes_to_the_checked_address_with_the_name_as_host() -> None:
    target, reason = resolve_target("http://localhost:1234/a?b=1", allow_private=True)
    assert reason is None and target.address in ("127.0.0.1", "::1")
    assert target.pinned_url.endswith(":1234/a?b=1") and "localhost" not in target.pinned_url
    hook = _Hook([])
    try:
        from service.jobs.callbacks import post_pinned

        post_pinned(f"http://localhost:{hook.port}/done", {"id": "x"}, 5, allow_private=True)
    finally:
        hook.close()
    assert hook.received[0][0] == f"localhost:{hook.port}" and hook.received[0][1] == {"id": "x"}


def test_delivery_retries_with_backoff_and_survives_a_restart(tmp_path) -> None:
    hook = _Hook([500, 503])
    url = f"http://127.0.0.1:{hook.port}/done"
    try:
        store = JobStore(tmp_path)
        store.outbox_add("job-1", url, {"id": "job-1", "status": "succeeded"})
        first = Deliverer(store, timeout_s=2, allow_private=True, base_delay_s=0.3)
        assert first.deliver_due() == 0  # 500: retried later, not dropped
        store.close()

        restarted = JobStore(tmp_path)  # a new process on the same data: the outbox is persisted
        assert restarted.outbox_size() == 1
        second = Deliverer(restarted, timeout_s=2, allow_private=True, base_delay_s=0.3, poll_s=0.05).start()
        deadline = time.monotonic() + 10
        while restarted.outbox_size() and time.monotonic() < deadline:
            time.sleep(0.05)
        second.stop()
    finally:
        hook.close()
    assert [body["id"] for _, body, _ in hook.received] == ["job-1"] * 3
    gaps = [b[2] - a[2] for a, b in zip(hook.received, hook.received[1:], strict=False)]
    assert gaps[0] >= 0.3 * 0.9 and gaps[1] >= 0.6 * 0.9, gaps  # backoff: base, then twice the base
    assert restarted.outbox_size() == 0


def test_refused_and_exhausted_deliveries_are_dropped(tmp_path) -> None:
    store = JobStore(tmp_path)
    store.outbox_add("job-2", "http://127.0.0.1:9/never", {"id": "job-2"})
    deliverer = Deliverer(store, timeout_s=1, allow_private=False)  # a private host: refused, never retried
    assert deliverer.deliver_due() == 0 and store.outbox_size() == 0
    store.outbox_add("job-3", "http://127.0.0.1:9/closed", {"id": "job-3"})
    stubborn = Deliverer(store, timeout_s=1, allow_private=True, max_attempts=2, base_delay_s=0)
    for _ in range(3):
        stubborn.deliver_due()
    assert store.outbox_size() == 0
