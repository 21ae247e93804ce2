"""The inference child of service.jobs.sandbox: killed at the time limit, and never outliving its
parent (a worker SIGKILLed mid-job must not leave an orphan computing on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARENT = """
import sys, threading, time
from service.jobs.sandbox import ChildRunner
from service.settings import Settings
runner = ChildRunner(Settings(device="cpu", weights_dir="weights"))
assert runner.call("loaded_models", 300) == []
job = dict(job_dir=sys.argv[1], model="sdt-meld7", settings=runner.settings)
threading.Thread(target=runner.call, args=("run_conversation_job", 600), kwargs=job, daemon=True).start()
print(runner._proc.pid, flush=True)
time.sleep(600)
"""


def test_a_busy_child_dies_with_its_parent(tmp_path) -> None:
    texts = [f"line {i}: the {i % 11} cats wanted dinner at {i % 24} o'clock" for i in range(3000)]
    conv = {"id": "c", "utterances": [{"id": f"u{i}", "speaker": "AB"[i % 2], "text": t} for i, t in enumerate(texts)]}
    (tmp_path / "request.json").write_text(json.dumps({"conversation": conv, "model": "sdt-meld7"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", PARENT, str(tmp_path)]
    parent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(3)  # loading the bundle and encoding: busy, not waiting on the pipe
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the inference child outlived its SIGKILLed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
