"""docker-compose.yml's stack run from the built images with podman, and checked: scripts/images.sh's second half.

The services' commands, environment and volumes are read from docker-compose.yml (``${VAR:-default}``
resolved as Compose does) and started with ``podman run``: redis (Debian's redis-server in
``localhost/merc-redis``), the API (``merc-api``) and one worker (``merc-worker``). What differs, and why:

* host networking (the only podman network that works on this kind of machine), so every port is a free
  one of this host and the service name ``redis`` resolves to 127.0.0.1 (``--add-host``); the API binds
  127.0.0.1 instead of 0.0.0.0;
* no GPU reservation (no GPU here): the worker runs on the CPU (``MERC_WORKER_DEVICE`` auto -> cpu);
* ``MERC_VISIBILITY_TIMEOUT_S`` is 60 s (compose: 1900) so that a killed worker's message comes back
  within the run even where nothing requeues it earlier; OMP_NUM_THREADS=1 on a shared 2-core host.

Checks, each one fatal: the API answers ``/readyz`` 200 with the worker up; a text conversation and a
media job (speech synthesised with espeak-ng, with its transcript) succeed in the worker container; a
media job whose worker container is killed (SIGKILL) mid-job still succeeds after the worker is started
again, and no job is lost. Containers and volumes are removed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"redis": "localhost/merc-redis", "api": "merc-api", "worker": "merc-worker"}
LINES = [
    "I can't believe you did that to me!",
    "I'm so sorry, it was an accident.",
    "That is wonderful news, congratulations!",
    "Okay. I guess we will see tomorrow.",
    "Why would anyone say something like that?",
    "Thank you, this means a lot to me.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interpolate(value: Any, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` substitution."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, str(value))


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


def speech(lines: list[str], path: Path) -> list[dict]:
    """One espeak-ng clip per line, joined into ``path`` (16 kHz mono); the utterances with their times."""
    utts, frames, t, params = [], [], 0.0, None
    for i, text in enumerate(lines):
        clip = subprocess.run(["espeak-ng", "-s", "165", "--stdout", text], capture_output=True, check=True).stdout
        with wave.open(io.BytesIO(clip)) as w:
            params = params or w.getparams()
            data = w.readframes(w.getnframes())  # what there is: --stdout cannot write the true length
            seconds = len(data) / (w.getsampwidth() * w.getnchannels() * w.getframerate())
        frames.append(data)
        span = {"start": round(t, 3), "end": round(t + seconds, 3)}
        utts.append({"id": f"u{i}", "speaker": "AB"[i % 2], "text": text, **span})
        t += seconds
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(b"".join(frames))
    return utts


class Stack:
    def __init__(self, compose: Path, weights: Path, variant: str) -> None:
        self.compose = yaml.safe_load(compose.read_text())
        self.weights, self.variant = weights, variant
        self.prefix = f"merc-stack-{os.getpid()}"
        self.ports = {"redis": free_port(), "api": free_port(), "metrics": free_port()}
        self.volumes = {name: f"{self.prefix}-{name}" for name in self.compose.get("volumes", {})}
        self.env = {**os.environ, "MERC_WEIGHTS": str(weights), "MERC_VISIBILITY_TIMEOUT_S": "60"}
        self.containers: list[str] = []
        self.api_url = f"http://127.0.0.1:{self.ports['api']}"

    def _environment(self, service: str) -> dict[str, str]:
        declared = self.compose["services"][service].get("environment") or {}
        env = {k: interpolate(v, self.env) for k, v in declared.items()}
        if "MERC_QUEUE" in env:
            env["MERC_QUEUE"] = env["MERC_QUEUE"].replace("redis:6379", f"redis:{self.ports['redis']}")
        if "MERC_WORKER_METRICS_PORT" in env:
            env["MERC_WORKER_METRICS_PORT"] = str(self.ports["metrics"])
        env["OMP_NUM_THREADS"] = "1"
        return env

    def _volumes(self, service: str) -> list[str]:
        args = []
        for spec in self.compose["services"][service].get("volumes") or []:
            src, _, rest = interpolate(spec, self.env).partition(":")
            src = self.volumes.get(src) or str((ROOT / src).resolve())
            args += ["-v", f"{src}:{rest}"]
        return args

    def run(self, service: str, command: list[str] | None = None) -> str:
        name = f"{self.prefix}-{service}"
        args = ["run", "-d", "--name", name, "--network", "host", "--add-host", "redis:127.0.0.1"]
        for k, v in self._environment(service).items():
            args += ["-e", f"{k}={v}"]
        args += self._volumes(service)
        image = f"{IMAGES[service]}:{self.variant}" if service == "worker" else IMAGES[service]
        podman(*args, image, *(command or []))
        self.containers.append(name)
        return name

    def start(self) -> None:
        for vol in self.volumes.values():
            podman("volume", "create", vol)
        redis_cmd = self.compose["services"]["redis"]["command"]
        port = str(self.ports["redis"])
        redis = self.run("redis", [*redis_cmd, "--port", port, "--bind", "127.0.0.1", "--dir", "/data"])
        self.wait(lambda: podman("exec", redis, "redis-cli", "-p", port, "ping") == "PONG", 30, "redis")
        self.worker = self.run("worker")  # its image's command: merc worker
        api_cmd = ["merc", "serve", "--host", "127.0.0.1", "--port", str(self.ports["api"])]
        self.api = self.run("api", api_cmd)
        self.wait(lambda: httpx.get(f"{self.api_url}/healthz", timeout=3).status_code == 200, 120, "API", self.api)
        self.wait_worker_ready()
        self.wait(lambda: httpx.get(f"{self.api_url}/readyz", timeout=3).status_code == 200, 60, "/readyz", self.api)

    def wait_worker_ready(self, timeout: float = 600) -> None:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        self.wait(lambda: "merc_worker_ready 1.0" in httpx.get(url, timeout=3).text, timeout, "worker", self.worker)

    def wait(self, check: Any, timeout: float, what: str, container: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if container and podman("inspect", "-f", "{{.State.Running}}", container) != "true":
                raise RuntimeError(f"{what}: container exited:\n{self.logs(container)}")
            try:
                if check():
                    return
            except (httpx.HTTPError, RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{self.logs(container) if container else ''}")

    def logs(self, container: str, tail: int = 40) -> str:
        return podman("logs", "--tail", str(tail), container, check=False, timeout=30)

    def stop(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "-f", "-v", "-t", "5", name, check=False, timeout=60)
        for vol in self.volumes.values():
            podman("volume", "rm", "-f", vol, check=False)


def finished(api: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = api.get(f"/v1/conversations/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {job.get('status')}")


def post_media(api: httpx.Client, wav: Path, utts: list[dict]) -> dict:
    transcript = json.dumps({"utterances": utts})
    files = {"audio": ("talk.wav", wav.read_bytes(), "audio/wav"), "transcript": (None, transcript)}
    r = api.post("/v1/conversations", params={"wait": 0}, files=files)
    assert r.status_code in (200, 202), r.text
    return r.json()


def check(stack: Stack, work: Path) -> Iterator[str]:
    """Each check in turn; yields a line for each that held (an AssertionError for the first that did not)."""
    with httpx.Client(base_url=stack.api_url, timeout=60) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 200, ready.text
        yield f"readyz 200: {ready.json().get('checks')}"

        t = time.monotonic()
        conv = {"utterances": [{"id": f"u{i}", "speaker": "AB"[i % 2], "text": x} for i, x in enumerate(LINES)]}
        r = api.post("/v1/conversations", params={"wait": 0}, json=conv)
        assert r.status_code in (200, 202), r.text
        job = finished(api, r.json()["id"], 300)
        assert job["status"] == "succeeded", job
        labels = [u["emotion"] for u in job["result"]["utterances"]]
        assert len(labels) == len(LINES), job["result"]
        yield f"text conversation: succeeded in {time.monotonic() - t:.1f} s, labels {labels}"

        short = work / "short.wav"
        utts = speech(LINES[:2], short)
        t = time.monotonic()
        job = finished(api, post_media(api, short, utts)["id"], 300)
        assert job["status"] == "succeeded", job
        assert job["media"]["audio"]["format"] == "wav" and len(job["result"]["utterances"]) == 2, job
        yield f"media job ({utts[-1]['end']:.1f} s of speech): succeeded in {time.monotonic() - t:.1f} s"

        # a longer media job, its worker container killed while it runs, then started again
        long = work / "long.wav"
        utts = speech(LINES * 4, long)
        job_id = post_media(api, long, utts)["id"]
        deadline = time.monotonic() + 120
        while api.get(f"/v1/conversations/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the long job never started"
            time.sleep(0.1)
        time.sleep(1.0)
        status = api.get(f"/v1/conversations/{job_id}").json()["status"]
        assert status == "running", f"the long job finished before the kill ({status}): make it longer"
        podman("kill", "-s", "KILL", stack.worker)
        t = time.monotonic()
        yield f"worker container killed (SIGKILL) while job {job_id} was running"
        after = api.get(f"/v1/conversations/{job_id}").json()
        assert after["status"] in ("running", "queued"), f"right after the kill: {after}"
        podman("start", stack.worker)
        stack.wait_worker_ready()
        job = finished(api, job_id, 300)
        assert job["status"] == "succeeded", job
        assert len(job["result"]["utterances"]) == len(utts) and job["attempts"] >= 2, job
        yield (
            f"killed job ({utts[-1]['end']:.1f} s of speech): succeeded {time.monotonic() - t:.1f} s after the kill,"
            f" attempt {job['attempts']}"
        )
        listed = api.get("/metrics").text
        lost = re.findall(r'^merc_queue_jobs\{status="(queued|running)"\} (\S+)', listed, flags=re.M)
        assert all(float(n) == 0 for _, n in lost), lost
        yield "no job queued or running at the end: none lost"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="cuda", help="the worker image's TORCH_VARIANT: runs merc-worker:VARIANT")
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("MERC_WEIGHTS", ROOT / "weights")))
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        print("podman_stack: espeak-ng is needed for the media jobs (apt-get install espeak-ng)", file=sys.stderr)
        return 1
    stack = Stack(ROOT / "docker-compose.yml", args.weights.resolve(), args.variant)
    t0 = time.monotonic()
    passed: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stack.start()
            print(f"stack: up in {time.monotonic() - t0:.0f} s (redis, api, worker {args.variant}), {stack.api_url}")
            passed.append("stack up")
            for line in check(stack, Path(tmp)):
                passed.append(line)
                print(f"stack: {line}", flush=True)
    except Exception as exc:
        print(f"stack: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name in stack.containers:
            print(f"--- {name}\n{stack.logs(name)}", file=sys.stderr)
        print(f"stack: {len(passed)} passed, 1 failed", flush=True)
        return 1
    finally:
        stack.stop()
    print(f"stack: every check held ({time.monotonic() - t0:.0f} s)")
    print(f"stack: {len(passed)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
