"""A real ``merc serve`` process per test module, talked to over HTTP with httpx."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT.parent / "shared" / "media"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``merc serve`` in a subprocess with its own data and cache directories."""

    def __init__(self, data_dir: Path, cache_dir: Path, **env: str) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MERC_DEVICE": "cpu",
            "MERC_TORCH_THREADS": "1",
            "MERC_CACHE_DIR": str(cache_dir),
            "MERC_DATA_DIR": str(data_dir),
            "MERC_WEIGHTS_DIR": str(ROOT / "weights"),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 300) -> Server:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory) -> Iterator:
    """Start servers with extra MERC_* settings; all are stopped when the module ends."""
    started: list[Server] = []
    cache = tmp_path_factory.mktemp("cache")

    def make(data_dir: Path | None = None, **env: str) -> Server:
        server = Server(data_dir or tmp_path_factory.mktemp("data"), cache, **env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def conversation(n: int = 3, prefix: str = "") -> dict:
    """A small text conversation in the canonical shape."""
    lines = [
        "I can't believe you did that to me!",
        "I'm so sorry, it was an accident.",
        "Wow, that's wonderful news, congratulations!",
        "I'm scared of what happens next.",
        "Okay.",
    ]
    return {
        "utterances": [
            {"id": f"u{i}", "speaker": "AB"[i % 2], "text": f"{prefix}{lines[i % len(lines)]}"} for i in range(n)
        ]
    }


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    """A problem+json answer with the given status naming ``field``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:merc:problem:")
    assert body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
        assert body["pointer"].startswith("/")
    return body
