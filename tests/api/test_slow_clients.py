"""Slow clients are cut off (issue 21 F8): request headers and bodies have read timeouts in `merc serve`."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.api.conftest import conversation

HEADER_S, BODY_S, RATE = 1.0, 1.5, 1000  # the server's MERC_HEADER_TIMEOUT_S, MERC_BODY_TIMEOUT_S, MERC_BODY_MIN_RATE
HANG_GUARD_S = 20.0  # a socket read that waits this long means the server never cut the client off


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(
        MERC_HEADER_TIMEOUT_S=str(HEADER_S), MERC_BODY_TIMEOUT_S=str(BODY_S), MERC_BODY_MIN_RATE=str(RATE)
    )


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(HANG_GUARD_S)
    return sock


def trickle(sock: socket.socket, pieces: list[bytes], every_s: float) -> None:
    """Send ``pieces`` one every ``every_s`` seconds, stopping quietly once the server hangs up."""
    for piece in pieces:
        try:
            sock.sendall(piece)
        except OSError:
            return
        time.sleep(every_s)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout: it never did)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def problem_of(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw[:300]
    assert b"application/problem+json" in head and b"connection: close" in head.lower()
    return json.loads(body)


POST = b"POST /v1/conversations HTTP/1.1\r\nHost: merc\r\nContent-Type: application/json\r\n"


def test_headers_sent_a_line_at_a_time_get_408_and_the_connection_closes(server):
    sock = connect(server)
    sender = threading.Thread(target=trickle, args=(sock, [POST] + [b"X-Slow: yes\r\n"] * 100, 0.3), daemon=True)
    sender.start()
    body = problem_of(answer(sock))
    assert body["status"] == 408 and "headers" in body["detail"] and f"{HEADER_S:g} s" in body["detail"]
    sock.close()


def test_a_stalled_body_gets_408_and_the_connection_closes(server):
    sock = connect(server)
    sock.sendall(POST + b"Content-Length: 100000\r\n\r\n" + b'{"utterances": [')
    body = problem_of(answer(sock))
    assert "sent nothing" in body["detail"]
    sock.close()


def test_a_body_trickling_below_the_minimum_rate_is_cut_off(server):
    sock = connect(server)
    sock.sendall(POST + b"Content-Length: 100000\r\n\r\n")
    sender = threading.Thread(target=trickle, args=(sock, [b" "] * 1000, 0.1), daemon=True)  # 10 bytes/s
    sender.start()
    body = problem_of(answer(sock))
    assert f"slower than {RATE:g} bytes/s" in body["detail"]
    sock.close()


def test_an_idle_connection_is_closed_without_an_answer(server):
    sock = connect(server)
    assert answer(sock) == b""
    sock.close()


def test_normal_clients_are_served_while_slow_ones_wait_and_a_steady_upload_is_not_cut(server):
    slow = [connect(server) for _ in range(5)]
    for sock in slow:
        sock.sendall(POST + b"Content-Length: 100000\r\n\r\n{")
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/conversations", json=conversation(2)).status_code == 200
    payload = json.dumps(conversation(2)).encode().ljust(3000)  # JSON with trailing spaces
    sock = connect(server)
    sock.sendall(POST + f"Content-Length: {len(payload)}\r\n\r\n".encode())
    pieces = [payload[i : i + 300] for i in range(0, len(payload), 300)]
    trickle(sock, pieces, 0.2)  # 1500 bytes/s for 2 s: longer than MERC_BODY_TIMEOUT_S, above the rate
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), "a steady upload was cut off"
    sock.close()
    for sock in slow:
        assert problem_of(answer(sock))["status"] == 408
        sock.close()
