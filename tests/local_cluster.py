"""The compose deployment as local processes: ``redis-server``, ``merc serve`` and ``merc worker``.

The same commands the services of docker-compose.yml run, with the same MERC_* variables,
on loopback ports and a temporary data directory. Used by the end-to-end tests and by
``benchmarks/workers_throughput.py``; handy on a machine without Docker::

    with LocalCluster(tmp_dir, workers=2) as cluster:
        httpx.post(f"{cluster.api_url}/v1/conversations", json=...)
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merc_command(*args: str) -> list[str]:
    """``merc ARGS`` with this interpreter (the console script when installed beside it)."""
    script = Path(sys.executable).with_name("merc")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "service.cli", *args]


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, killed with SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Proc:
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: dies mid-job, as when the host loses power or the OOM killer strikes."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log:
            self._log.close()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def wait_until(check: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
    """Poll ``check()`` until true; raise with ``proc``'s log if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            if check():
                return
        except Exception:  # not answering yet (connection refused, reset, 503)
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{proc.tail() if proc else ''}")


class LocalCluster:
    """redis-server + the API in distributed mode + N workers, like ``docker compose up``."""

    def __init__(self, base: Path, workers: int = 2, ready_timeout: float = 180, **env: str) -> None:
        """``ready_timeout``: seconds the API and each worker may take to be ready (models load slowly
        on a shared, loaded host); ``env``: MERC_* settings of every process."""
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
        self.base = Path(base)
        self.data_dir, self.logs = self.base / "data", self.base / "logs"
        for d in (self.data_dir, self.logs, self.base / "redis", self.base / "cache"):
            d.mkdir(parents=True, exist_ok=True)
        self._ports: set[int] = set()
        self.redis_port, self.api_port = self.free_port(), self.free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.queue_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = self._env(env)
        self.n_workers, self.ready_timeout = workers, ready_timeout
        self.redis: Proc | None = None
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.metrics_ports: list[int] = []

    def free_port(self) -> int:
        """A free port never handed out by this cluster before (a port is free until its process binds
        it: a worker's metrics server once took the API's port, and answered its /readyz)."""
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        return port

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MERC_TORCH_THREADS": "1",
            "MERC_DEVICE": "cpu",
            "MERC_QUEUE": self.queue_url,
            "MERC_DATA_DIR": str(self.data_dir),
            "MERC_WEIGHTS_DIR": str(ROOT / "weights"),
            "MERC_CACHE_DIR": str(self.base / "cache"),
            "MERC_WORKERS": "0",
            "MERC_LOG_FORMAT": "json",
            **extra,
        }

    def start_redis(self) -> None:
        cmd = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.base / "redis")]
        cmd += ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", "--save", ""]
        self.redis = Proc("redis", cmd, self.env, self.logs).start()
        wait_until(self._redis_ping, 20, "redis-server", self.redis)

    def _redis_ping(self) -> bool:
        import redis

        return bool(redis.Redis.from_url(self.queue_url, socket_timeout=1).ping())

    def start_api(self, timeout: float = 120) -> None:
        cmd = merc_command("serve", "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", "warning")
        self.api = Proc("api", cmd, self.env, self.logs).start()
        wait_until(lambda: httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200, timeout, "API", self.api)

    def start_worker(self, wait: bool = True) -> Proc:
        """One more ``merc worker`` (node name w<i>@host); ``wait``: until its models are loaded."""
        i, port = len(self.workers) + 1, self.free_port()
        env = {**self.env, "MERC_WORKER_METRICS_PORT": str(port)}
        worker = Proc(f"worker{i}", merc_command("worker", "--name", f"w{i}@%h"), env, self.logs).start()
        self.workers.append(worker)
        self.metrics_ports.append(port)
        if wait:
            self.wait_worker_ready(i - 1)
        return worker

    def wait_worker_ready(self, index: int, timeout: float = 180) -> None:
        ready = lambda: "merc_worker_ready 1.0" in self.worker_metrics(index)  # noqa: E731
        wait_until(ready, timeout, self.workers[index].name, self.workers[index])

    def worker_metrics(self, index: int) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[index]}/metrics", timeout=3).text

    def __enter__(self) -> LocalCluster:
        try:
            self.start_redis()
            for _ in range(self.n_workers):  # loading models in parallel with the API
                self.start_worker(wait=False)
            self.start_api(self.ready_timeout)
            for i in range(self.n_workers):
                self.wait_worker_ready(i, self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to every worker at once (each finishes its job), then the API, then Redis."""
        for w in self.workers:
            if w.alive():
                w.proc.terminate()
        for p in [*self.workers, self.api, self.redis]:
            if p is not None:
                p.stop()


# ---------------------------------------------------------------- a synthetic workload

LINES = ["I can't believe you did that!", "I'm so sorry, it was an accident.", "That's wonderful news!", "Okay."]


def sample_conversation(n: int, span_s: float | None = None, tag: str = "") -> dict:
    """``n`` alternating turns; with ``span_s``, timed to fit inside media that long.

    ``tag`` goes into every text: a new tag defeats the text-embedding cache.
    """
    texts = [f"{LINES[i % len(LINES)]} ({tag}{i})" for i in range(n)]
    utts = [{"id": f"u{i}", "speaker": "AB"[i % 2], "text": t} for i, t in enumerate(texts)]
    for i, u in enumerate(utts if span_s else []):
        u["start"], u["end"] = round(i * span_s / n, 3), round((i + 0.9) * span_s / n, 3)
    return {"utterances": utts}


def sample_wav(seconds: float, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV of a tone, as an uploaded recording."""
    samples = (np.sin(np.arange(int(rate * seconds)) * 0.11) * 6000).astype("<i2")
    with io.BytesIO() as buf, wave.open(buf, "wb") as w:
        w.setparams((1, 2, rate, len(samples), "NONE", "not compressed"))
        w.writeframes(samples.tobytes())
        w.close()
        return buf.getvalue()
