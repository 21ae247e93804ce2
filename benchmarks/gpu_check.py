"""The GPU path as one prepared check: the CUDA code paths that CPU hosts never run, with their figures.

Steps (each in its own subprocess with its own timeout; a failing or timed-out step is recorded, never
fatal; the JSON is rewritten after every step, so a run cut short still leaves what it measured):

``env``            torch, CUDA and GPU facts.
``text_fp16``      the default bundle's fine-tuned MiniLM extractor as the service runs it on ``--device``
                   (``model.half()`` on CUDA) against the same extractor in fp32 on the CPU: cosine and
                   largest difference of the vectors, milliseconds per 20-turn conversation each way.
``finetune_amp``   a LoRA fine-tune of MiniLM (models.text_finetune, pair mode, batch 16) for ``steps``
                   optimiser steps with autocast + GradScaler, and again without AMP: seconds per step.
                   Synthetic conversations with random labels: the loss is meaningless, the speed is not.
``face_detection`` batched MTCNN (service.features.mtcnn_batched) on ``--device`` against the CPU on the
                   same frames (faces found, box agreement, frames/s at two batch sizes); the face CNN and
                   the face reading's mini-Xception in fp16 against fp32 (largest probability difference).
``whisper``        faster-whisper with the packaged tiny.en on ``--device`` (float16 on CUDA) against
                   CPU int8: seconds, real-time factor, the words; records a silent fallback to the CPU.
``media_pipeline`` benchmarks/media_pipeline.py --device (needs the face video of ../shared/media).
``speed_text``     benchmarks/speed_text.py --device (the text path in process).

Media come from ``--media`` (default ../shared/media): the face video, and speech from the CREMA-D clips
or Emo-DB files; without them the face step uses scikit-image's astronaut when installed, else it is
skipped, and the Whisper step times a synthetic signal (no words to compare).

``--device cuda`` runs the full size (about 4-6 minutes on one GPU; the whole run is capped by
``--budget``, 480 s by default); ``--device cpu`` runs the same steps at a dry-run size (a minute or
two; tests/service/test_gpu_check.py runs it). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --device cuda --out gpu_check.json
    benchmarks/gpu_check.sh [OUT.json]        # sets up .venv when missing, then the line above
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("env", "text_fp16", "finetune_amp", "face_detection", "whisper", "media_pipeline", "speed_text")
# Per-step wall limits (s) at the full size; the dry run gets the same limits (it needs far less).
LIMITS = {"env": 60, "text_fp16": 90, "finetune_amp": 150, "face_detection": 90, "whisper": 90,
          "media_pipeline": 120, "speed_text": 150}  # fmt: skip
SIZES: dict[str, dict[str, int]] = {
    "full": {"convs": 64, "turns": 20, "steps": 300, "frames": 256, "clips": 6, "repeats": 3, "batch": 10, "n": 20},
    "dry": {"convs": 2, "turns": 6, "steps": 3, "frames": 4, "clips": 1, "repeats": 1, "batch": 1, "n": 2},
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - started


def step_env(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "device": device,
                           "cpu_count": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    return out


def _conversations(size: dict[str, int], seed: int = 0) -> list[Any]:
    from benchmarks.text_finetune import fresh_conversation
    from models.data import Conversation

    rng = random.Random(seed)
    return [Conversation(f"c{i}", fresh_conversation(size["turns"], rng).utterances) for i in range(size["convs"])]


def step_text_fp16(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    import numpy as np

    from service.features.finetuned import FinetunedTextEncoder, absolute_spec, resolve_directory
    from service.settings import Settings

    bundle = ROOT / "weights" / Settings().default_model
    entry = absolute_spec(json.loads((bundle / "manifest.json").read_text())["feature_spec"], bundle)["text"]
    directory = resolve_directory(entry, None)
    convs = _conversations(size)
    out: dict[str, Any] = {"bundle": bundle.name, "extractor": entry["extractor"], "conversations": len(convs),
                           "turns": size["turns"]}  # fmt: skip
    vectors = {}
    for name, dev in (("served", device), ("fp32_cpu", "cpu")):
        enc = FinetunedTextEncoder(entry, directory, dev, use_disk_cache=False, int8=False)
        enc.load().conversation_vectors(_conversations({**size, "convs": 1}, seed=1))  # warm-up
        got, seconds = _timed(lambda enc=enc: enc.conversation_vectors(convs), dev)
        vectors[name] = np.stack([v for row in got for v in row if v is not None]).astype(np.float64)
        out[f"{name}_ms_per_conversation"] = round(1000 * seconds / len(convs), 2)
        out[f"{name}_dtype"] = str(next(enc._model.parameters()).dtype)
    a, b = vectors["served"], vectors["fp32_cpu"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    speedup = out["fp32_cpu_ms_per_conversation"] / out["served_ms_per_conversation"]
    out |= {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": float(np.abs(a - b).max()), "norm_mean": round(float(np.linalg.norm(b, axis=1).mean()), 3),
            "speedup_vs_cpu_fp32": round(speedup, 2)}  # fmt: skip
    return out


def _finetune(device: str, size: dict[str, int], amp: bool) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    from models.text_finetune import ContextWindow, FineTuneConfig, conversation_pairs, finetune_text_encoder
    from service.features.text import _resolve_source

    source = _resolve_source("minilm-l6-v2", None)
    where = str(source.locate())
    window = ContextWindow(past=2, future=0, max_length=80)
    cfg = FineTuneConfig(window=window, epochs=1, max_steps=size["steps"], amp=amp, patience=99)
    n_utts = size["steps"] * cfg.batch_size
    turns = size["turns"]
    train_convs = _conversations({"convs": -(-n_utts // turns), "turns": turns}, seed=2)
    dev_convs = _conversations({"convs": max(1, size["convs"] // 8), "turns": turns}, seed=3)
    rng = random.Random(4)

    def data(convs: list[Any]) -> tuple[list[Any], list[list[int]]]:
        return conversation_pairs(convs, window), [[rng.randrange(7) for _ in c.utterances] for c in convs]

    encoder = AutoModel.from_pretrained(where, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    labels = [f"c{i}" for i in range(7)]
    _, seconds = _timed(lambda: finetune_text_encoder(encoder, tokenizer, source.dim, data(train_convs),
                                                      data(dev_convs), labels, cfg, device, progress=None,
                                                      show_bar=False), device)  # fmt: skip
    return {"amp": amp and device.startswith("cuda"), "steps": size["steps"], "batch": cfg.batch_size,
            "seconds": round(seconds, 2), "s_per_step": round(seconds / size["steps"], 4)}  # fmt: skip


def step_finetune_amp(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    runs = [_finetune(device, size, amp=True)]
    if device.startswith("cuda"):
        runs.append(_finetune(device, size, amp=False))
    out: dict[str, Any] = {"runs": runs, "note": "pair mode, past 2, 80 tokens, one small dev evaluation included"}
    if len(runs) == 2:
        out["amp_speedup"] = round(runs[1]["s_per_step"] / runs[0]["s_per_step"], 2)
    return out


def _face_frames(media: Path, n: int) -> tuple[Any, str]:
    """(n, H, W, 3) uint8 RGB frames at a 240 px short side with faces, and where they came from."""
    import numpy as np

    video = media / "WolfgangLanger_Pexels.mp4"
    if video.is_file():
        from service.media.decode import FrameSampling, decode_media

        frames: list[Any] = []
        seconds = n / 23.976 + 0.5  # decode only as far as n frames need
        decode_media(video, [(0.0, seconds)], want_audio=False, sink=lambda f, o, c: frames.extend(f),
                     sampling=FrameSampling(1, 240, 32))  # fmt: skip
        picked = [frames[i % len(frames)] for i in range(n)]
        return np.stack(picked), video.name
    from PIL import Image
    from skimage import data  # scikit-image's bundled astronaut photograph (one face)

    image = Image.fromarray(data.astronaut()).resize((240, 240))
    base = np.asarray(image)
    return np.stack([np.roll(base, 4 * i, axis=1) for i in range(n)]), "skimage astronaut, shifted"


def step_face_detection(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from service.features.face_models import load_batched_mtcnn, load_pyemotion
    from service.features.visual import THRESHOLDS

    frames, source = _face_frames(media, size["frames"])
    out: dict[str, Any] = {"frames": len(frames), "source": source, "shape": list(frames.shape[1:])}
    found = {}
    for name, dev in (("device", device), ("cpu", "cpu")):
        det = load_batched_mtcnn(torch.device(dev), 24, THRESHOLDS)
        for batch in (16, 64) if name == "device" else (16,):
            det.detect(frames[:batch])  # warm-up
            got, seconds = _timed(lambda det=det, b=batch: [f for i in range(0, len(frames), b)
                                                            for f in det.detect(frames[i : i + b])], dev)  # fmt: skip
            out[f"{name}_batch{batch}_frames_per_s"] = round(len(frames) / seconds, 1)
            found[name] = got
    a, b = found["device"], found["cpu"]
    out["faces_device"], out["faces_cpu"] = sum(len(f.probs) for f in a), sum(len(f.probs) for f in b)
    both = [(x.boxes[0], y.boxes[0]) for x, y in zip(a, b, strict=True) if len(x.probs) and len(y.probs)]
    out["max_box_diff_px"] = round(float(max((np.abs(p - q).max() for p, q in both), default=0.0)), 3)
    crops = torch.rand(64, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    ref = load_pyemotion(torch.device("cpu"), half=False)
    test = load_pyemotion(torch.device(device), half=device.startswith("cuda"))
    with torch.inference_mode():
        p_ref = torch.softmax(ref.expression_logits(ref(crops)[0]), 1)
        hidden = test(crops.to(device, next(test.parameters()).dtype))[0]
        p_test = torch.softmax(test.expression_logits(hidden).float(), 1).cpu()
    out["face_cnn_dtype"] = str(next(test.parameters()).dtype)
    out["face_cnn_max_prob_diff"] = float((p_ref - p_test).abs().max())
    from service.features.fer_minixception import load_minixception  # the face reading's classifier

    faces = torch.rand(64, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    ref_reader = load_minixception(torch.device("cpu"), half=False)
    reader = load_minixception(torch.device(device), half=device.startswith("cuda"))
    with torch.inference_mode():
        p_ref, p_test = ref_reader(faces), reader(faces.to(device, next(reader.parameters()).dtype)).cpu()
    out["face_reading_max_prob_diff"] = float((p_ref - p_test).abs().max())
    return out


def _speech(media: Path, n_clips: int) -> tuple[Any, str]:
    import numpy as np

    from service.media.decode import SAMPLE_RATE, decode_media

    clips = (sorted((media / "cremad").glob("*.flv")) or sorted((media / "emodb").glob("*.wav")))[:n_clips]
    if clips:
        parts = [decode_media(c, [(0.0, None)]).audio for c in clips]
        gap = np.zeros(SAMPLE_RATE // 2, np.float32)
        return np.concatenate([x for p in parts for x in (p, gap)]), f"{len(clips)} clips of {clips[0].parent.name}"
    t = np.arange(12 * SAMPLE_RATE) / SAMPLE_RATE  # a 12 s voiced-like synthetic signal: times, no words
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    signal = 0.3 * np.sign(np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE)) * (np.sin(2 * np.pi * 3 * t) > 0)
    return signal.astype(np.float32), "synthetic 12 s"


def step_whisper(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    from service.features.speech import SpeechRecognizer
    from service.media.decode import SAMPLE_RATE

    signal, source = _speech(media, size["clips"])
    audio_s = len(signal) / SAMPLE_RATE
    out: dict[str, Any] = {"audio": source, "audio_s": round(audio_s, 2)}
    for name, dev in (("device", device), ("cpu", "cpu")):
        rec = SpeechRecognizer(dev)
        asked = rec.device
        rec.transcribe(signal[: 3 * SAMPLE_RATE])  # load + warm-up
        transcript, seconds = _timed(lambda rec=rec: rec.transcribe(signal), "cpu")
        out[name] = {"asked": asked, "ran_on": rec.device, "compute_type": rec.compute_type,
                     "seconds": round(seconds, 3), "rtf": round(seconds / audio_s, 4),
                     "stages": {k: round(v, 3) for k, v in transcript.seconds.items()},
                     "text": " | ".join(u.text for u in transcript.utterances)}  # fmt: skip
        if dev == "cpu" and device == "cpu":
            break
    if out["device"]["asked"] != out["device"]["ran_on"]:
        out["fell_back_to_cpu"] = True
    return out


def _script(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run a benchmark script (the step's own limit bounds it); its printed lines and trailing JSON report."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line == "{"), None)
    report = json.loads("\n".join(lines[start:])) if start is not None else None
    return {"lines": lines[:start] if start is not None else lines, "report": report}


def step_media_pipeline(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    video = media / "WolfgangLanger_Pexels.mp4"
    if not video.is_file():
        raise FileNotFoundError(f"{video} absent (pass --media)")
    args = ["benchmarks/media_pipeline.py", "--device", device, "--video", str(video),
            "--repeats", str(size["repeats"]), "--batch", str(size["batch"])]  # fmt: skip
    return _script(args + ([] if size is SIZES["full"] else ["--no-naive"]), None)


def step_speed_text(device: str, size: dict[str, int], media: Path) -> dict[str, Any]:
    args = ["benchmarks/speed_text.py", "--device", device, "--n", str(size["n"]), "--threads", "1"]
    return _script(args + ([] if size is SIZES["full"] else ["--no-accuracy", "--no-small-inputs"]), None)


def run_group(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, stderr) of ``cmd`` in a process group of its own; on timeout the whole group (the
    benchmark scripts and `merc evaluate` a step starts too) is killed before TimeoutExpired is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err


def run_step(name: str, device: str, size_name: str, media: Path, result: Path) -> None:
    """One step in this process: its figures to ``result`` (JSON)."""
    import torch

    torch.set_num_threads(int(os.environ.get("MERC_GPU_CHECK_THREADS", "1")))
    figures = globals()[f"step_{name}"](device, SIZES[size_name], media)
    result.write_text(json.dumps(figures, indent=1, default=str))


def drive(
    device: str, size_name: str, steps: list[str], media: Path, out: Path, budget: float, scale: float = 1.0
) -> dict[str, Any]:
    """Every step in its own subprocess under its limit (x ``scale``) and what is left of ``budget``; the JSON
    is rewritten after each step."""
    started = time.perf_counter()
    report: dict[str, Any] = {"device": device, "size": size_name, "budget_s": budget, "steps": {}}
    for name in steps:
        left = budget - (time.perf_counter() - started)
        if left < 5:
            report["steps"][name] = {"status": "skipped", "error": "wall budget spent"}
            continue
        t0, limit = time.perf_counter(), min(LIMITS[name] * scale, left)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--run-step", name, "--device", device, "--size", size_name,
                   "--media", str(media), "--result", str(result)]  # fmt: skip
            try:
                code, err = run_group(cmd, limit)
                entry: dict[str, Any] = {"status": "ok" if code == 0 else "failed"}
                if code:
                    entry["error"] = err.strip()[-2000:]
                elif result.is_file():
                    entry["figures"] = json.loads(result.read_text())
            except subprocess.TimeoutExpired:
                entry = {"status": "timeout", "error": f"over its {limit:.0f} s limit"}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"][name] = entry
        report["wall_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=1))
        print(f"{name}: {entry['status']} in {entry['seconds']} s", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (full size) or cpu (dry run)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on cuda, dry on cpu")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    ap.add_argument("--budget", type=float, default=None, help="wall seconds for all steps [480 full, 1800 dry]")
    ap.add_argument("--limit-scale", type=float, default=None, help="step limits x this [1 full, 4 dry: slow CPUs]")
    ap.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size or ("full" if args.device.startswith("cuda") else "dry")
    if args.run_step:
        run_step(args.run_step, args.device, size, args.media, args.result)
        return
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        sys.exit(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (480.0 if size == "full" else 1800.0)
    scale = args.limit_scale or (1.0 if size == "full" else 4.0)
    report = drive(args.device, size, steps, args.media, args.out, budget, scale)
    bad = [k for k, v in report["steps"].items() if v["status"] != "ok"]
    print(f"wrote {args.out}: {len(steps) - len(bad)}/{len(steps)} steps ok" + (f"; not ok: {bad}" if bad else ""))


if __name__ == "__main__":
    main()
