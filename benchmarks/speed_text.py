"""Text path speed on CPU: the service's scoring path in process, a plain MiniLM reference, int8 drift.

Prints, in one run:

* (a) in-process text scoring with the default bundle (``Settings.default_model``, or ``--bundle``):
  20 fresh turns (features + fusion model, ``service.inference.pipeline.extract_features`` + ``score``) and
  4 appends of 1 turn each after them, one by one as a chat goes on (turns 20..23; ``first=k,
  future_known=False``: only the new turn is encoded; in conversation mode, 3 of 4 join the open chunk
  whose keys/values are cached), p50/p99 wall milliseconds and the CPU milliseconds per call (all threads), for fp32 and
  int8 (``MERC_TEXT_INT8``) and 1 and 2 torch threads. Every call has new sentences: the embedding
  caches (memory and SQLite, in a temporary ``MERC_CACHE_DIR``) never hit.
* (b) the same 20 turns through the plain MiniLM-L6 encoder (no context, no speaker), for reference.
* (c) the dev weighted F1 of the bundle with fp32 and int8 text features (``merc evaluate`` in a
  subprocess each; skipped with ``--no-accuracy`` or without ../shared/data/<dataset>/dev.jsonl); for
  a bundle whose text encoder was distilled from another bundle's (``merc finetune-text --distill``,
  ``merc rebase-text``), also that bundle's: the accuracy without the speed-up.
* (e) where the milliseconds of a small input go: the MiniLM encoder's forward by input length (12 to
  100 tokens, 1 thread), a 12-token turn appended after 40 cached tokens
  (``models.text_chunks.forward_kv``), a write of one vector to the SQLite embedding cache, and 16
  appends to 16 chats in one encoder call (a micro-batch; conversation-mode extractor
  ``weights/text/meld7-minilm-conv-warm``) with the open chunks' keys/values cached and without.
* (d) with ``--http``: ``benchmarks/api_cpu.py --clients-list 1,4,16`` (a real ``merc serve``).

On a shared machine the wall figures depend on the load (printed); the CPU milliseconds much less.

Run::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/speed_text.py [--n 20] [--bundle NAME] [--http]

``--device cuda`` times the same paths on the GPU (the fine-tuned encoder in fp16 there; no int8 rows, int8 is a
CPU quantization; benchmarks/gpu_check.py passes it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.text_finetune import fresh_conversation  # noqa: E402
from models.data import Conversation  # noqa: E402

os.environ.setdefault("MERC_CACHE_DIR", tempfile.mkdtemp(prefix="merc-speed-text-"))  # fresh caches


def _ms(seconds: list[float]) -> str:
    a = np.array(seconds) * 1000
    return f"p50 {np.percentile(a, 50):.0f} ms p99 {np.percentile(a, 99):.0f} ms"


def _timed(fn, *args: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn(*args)``, GPU work included (synchronised)."""
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def scoring(bundle: str, n: int, threads: int, int8: bool, rng: random.Random, device: str = "cpu") -> dict[str, float]:
    """Latency of a 20-turn POST and a 1-turn append through the service's scoring path."""
    import service.features.finetuned as ft
    from service.inference.pipeline import extract_features, score
    from service.inference.predictor import Predictor

    os.environ["MERC_TEXT_INT8"] = "1" if int8 else "0"
    ft._LOADED.clear()  # a new encoder with this int8 setting
    torch.set_num_threads(threads)
    predictor = Predictor(bundle, device, ROOT / "weights")
    spec = predictor.feature_spec

    def post(conv: Conversation) -> None:
        feats, timings = extract_features(conv, spec, None, device)
        score(predictor, conv, feats, ["text"], timings)

    def append(conv: Conversation) -> None:
        feats, timings = extract_features(conv, spec, None, device, first=len(conv.utterances) - 1, future_known=False)
        score(predictor, conv, feats, ["text"], timings, future_known=False)

    for _ in range(2):  # load + warm
        post(fresh_conversation(20, rng))
    rows: dict[str, list[tuple[float, float]]] = {"post": [], "append": []}
    for _ in range(n):
        conv = fresh_conversation(24, rng)
        rows["post"].append(_timed(post, Conversation(id="b", utterances=conv.utterances[:20])))
        for k in range(21, 25):
            rows["append"].append(_timed(append, Conversation(id="b", utterances=conv.utterances[:k])))
    out = {}
    for k, v in rows.items():
        wall, cpu = zip(*v, strict=True)
        out[f"{k}_wall_p50_ms"] = float(np.percentile(wall, 50) * 1000)
        out[f"{k}_wall_p99_ms"] = float(np.percentile(wall, 99) * 1000)
        out[f"{k}_cpu_p50_ms"] = float(np.percentile(cpu, 50) * 1000)
    print(
        f"{bundle} {'int8' if int8 else 'fp32'} {device} {threads} thread(s): "
        f"20 fresh turns {_ms([w for w, _ in rows['post']])}"
        f" (CPU {out['post_cpu_p50_ms']:.0f} ms); append 1 turn {_ms([w for w, _ in rows['append']])}"
        f" (CPU {out['append_cpu_p50_ms']:.0f} ms)",
        flush=True,
    )
    return out


def plain_minilm(n: int, threads: int, rng: random.Random, device: str = "cpu") -> dict[str, float]:
    """The same kind of 20 fresh turns through the context-free MiniLM encoder (no cache)."""
    from service.features.text import get_text_encoder

    torch.set_num_threads(threads)
    encoder = get_text_encoder("minilm-l6-v2", device=device, use_cache=False)
    encoder.encode([u.text for u in fresh_conversation(20, rng).utterances])
    rows = [_timed(lambda: encoder.encode([u.text for u in fresh_conversation(20, rng).utterances])) for _ in range(n)]
    wall, cpu = zip(*rows, strict=True)
    print(
        f"plain minilm-l6-v2, 20 turns, {threads} thread(s): {_ms(list(wall))} (CPU {np.median(cpu) * 1000:.0f} ms)",
        flush=True,
    )
    return {"wall_p50_ms": float(np.median(wall) * 1000), "cpu_p50_ms": float(np.median(cpu) * 1000)}


def small_inputs(n: int, device: str = "cpu") -> dict[str, float]:
    """(e): encoder forward p50 ms by length, an append after cached keys/values, a cache write."""
    from transformers import AutoModel

    from models.text_chunks import forward_kv
    from service.features.text import EmbeddingCache, FeatureSpec, _resolve_source

    torch.set_num_threads(1)
    where = str(_resolve_source("minilm-l6-v2", None).locate())
    model = AutoModel.from_pretrained(where, local_files_only=True).eval().to(device)

    def ints(length: int) -> torch.Tensor:
        return torch.randint(1000, 5000, (1, length), device=device)

    def mask(rows: int, cols: int) -> torch.Tensor:
        return torch.ones(1, rows, cols, dtype=torch.bool, device=device)

    def p50(fn) -> float:
        fn()
        return float(np.median([_timed(fn)[0] for _ in range(n)]) * 1000)

    out: dict[str, float] = {}
    with torch.no_grad():
        for length in (12, 40, 100):
            ids = ints(length)
            out[f"forward_{length}_tokens_ms"] = p50(lambda ids=ids: model(input_ids=ids))
        _, past = forward_kv(model, ints(40), mask(40, 40))
        new, allowed = ints(12), mask(12, 52)
        out["append_12_after_40_cached_ms"] = p50(lambda: forward_kv(model, new, allowed, past))
    cache = EmbeddingCache(tempfile.mkdtemp(prefix="merc-cache-"), FeatureSpec("bench", "v1", 384))
    vec, count = np.ones((1, 384), np.float32), iter(range(10**9))
    out["cache_write_1_vector_ms"] = p50(lambda: cache.put_many([f"t{next(count)}"], vec))
    print(
        "small inputs, MiniLM forward: "
        + ", ".join(f"{k.split('_')[1]} tokens {v:.1f} ms" for k, v in out.items() if k.startswith("forward"))
        + f"; 12 tokens after 40 cached {out['append_12_after_40_cached_ms']:.1f} ms"
        + f"; embedding-cache write {out['cache_write_1_vector_ms']:.2f} ms",
        flush=True,
    )
    return out


def batched_appends(n: int, rng: random.Random, device: str = "cpu") -> dict[str, float]:
    """(e): 16 appends (turn 22 of 16 chats) in one conversation-mode encoder call, with and without
    ``MERC_TEXT_KV_CACHE_MB`` (the open chunks' keys/values)."""
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    folder = ROOT / "weights" / "text" / "meld7-minilm-conv-warm"
    out: dict[str, float] = {}
    for label, budget in (("no_kv_cache", "0"), ("kv_cache", "64")):
        os.environ["MERC_TEXT_KV_CACHE_MB"] = budget
        enc = FinetunedTextEncoder(spec_entry(folder, folder.name), folder, device, use_disk_cache=False)
        times = []
        for _ in range(max(3, n // 4)):
            convs = [Conversation(id=f"c{i}", utterances=fresh_conversation(23, rng).utterances) for i in range(16)]
            enc.conversation_vectors([Conversation(id=c.id, utterances=c.utterances[:22]) for c in convs], False)
            times.append(_timed(enc.conversation_vectors, convs, False, [22] * 16)[0])
        out[f"16_appends_{label}_ms"] = float(np.median(times[1:]) * 1000)
    os.environ.pop("MERC_TEXT_KV_CACHE_MB")
    print(
        f"16 appends in one call (conversation mode): {out['16_appends_no_kv_cache_ms']:.0f} ms without the "
        f"key/value cache, {out['16_appends_kv_cache_ms']:.0f} ms with it",
        flush=True,
    )
    return out


def dev_accuracy(bundle: str, int8: bool, device: str = "cpu") -> float | None:
    """Dev weighted F1 (``merc evaluate``) with int8 text features on or off; None without the data."""
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else ROOT / "weights" / bundle
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    dev = ROOT.parent / "shared" / "data" / manifest["dataset"]["name"] / "dev.jsonl"
    if not dev.is_file():
        print(f"dev accuracy skipped: {dev} absent")
        return None
    env = {**os.environ, "MERC_TEXT_INT8": "1" if int8 else "0", "OMP_NUM_THREADS": "1"}
    out = Path(tempfile.mkdtemp(prefix="merc-eval-"))
    cmd = [str(ROOT / ".venv" / "bin" / "merc"), "evaluate", "--bundle", str(bundle_dir), "--data", str(dev)]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--device", device, "--quiet"], env=env, capture_output=True, text=True, check=True
    )
    wf1 = float(json.loads(proc.stdout.strip().splitlines()[-1])["weighted_f1"])
    print(f"{bundle} dev weighted F1 ({dev.parent.name}), {'int8' if int8 else 'fp32'} text encoder: {wf1:.2f}")
    return wf1


def teacher_bundle(bundle: str) -> str | None:
    """The bundle ``bundle`` stands in for with a distilled text encoder: the one it was rebased from
    (``merc rebase-text``), or the bundle of the same architecture and dataset whose text encoder is the
    teacher of ``bundle``'s (``merc finetune-text --distill``): the accuracy without that speed-up."""
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else ROOT / "weights" / bundle
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    name = (manifest.get("rebased") or {}).get("from_bundle")
    if name:
        return name if (ROOT / "weights" / name).is_dir() else None
    text = manifest.get("feature_spec", {}).get("text") or {}
    meta = bundle_dir / str(text.get("adapter", "")) / "finetune.json"
    teacher = json.loads(meta.read_text()).get("distill_sha256") if text.get("adapter") and meta.is_file() else None
    for other in sorted((ROOT / "weights").glob("*/manifest.json")) if teacher else []:
        m = json.loads(other.read_text())
        same = (m.get("architecture"), m.get("dataset", {}).get("name")) == (
            manifest.get("architecture"),
            manifest.get("dataset", {}).get("name"),
        )
        if same and (m.get("feature_spec", {}).get("text") or {}).get("adapter_sha256") == teacher:
            return other.parent.name
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle name in weights/ or a folder [Settings().default_model]")
    ap.add_argument("--n", type=int, default=20, help="calls per latency figure")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to time")
    ap.add_argument("--no-accuracy", action="store_true", help="skip (c), the dev evaluation")
    ap.add_argument("--http", action="store_true", help="also run benchmarks/api_cpu.py --clients-list 1,4,16")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--no-small-inputs", action="store_true", help="skip (e) (benchmarks/gpu_check.py's dry run)")
    args = ap.parse_args()
    device = args.device
    from service.settings import Settings

    bundle = args.bundle or Settings().default_model
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs, torch {torch.__version__}")
    rng = random.Random(0)
    threads = [int(t) for t in args.threads.split(",")]
    report: dict = {"bundle": bundle, "scoring": {}, "plain_minilm": {}}
    report["device"] = device
    for int8 in (False, True) if device == "cpu" else (False,):
        for t in threads:
            report["scoring"][f"{'int8' if int8 else 'fp32'}_t{t}"] = scoring(bundle, args.n, t, int8, rng, device)
    for t in threads:
        report["plain_minilm"][f"t{t}"] = plain_minilm(args.n, t, rng, device)
    if not args.no_small_inputs:
        report["small_inputs"] = small_inputs(args.n, device) | batched_appends(args.n, rng, device)
    if not args.no_accuracy:
        kinds = ("fp32", "int8") if device == "cpu" else ("fp32",)
        report["dev_weighted_f1"] = {k: dev_accuracy(bundle, k == "int8", device) for k in kinds}
        f32, i8 = report["dev_weighted_f1"]["fp32"], report["dev_weighted_f1"].get("int8")
        if f32 is not None and i8 is not None:
            print(f"int8 drift: {i8 - f32:+.2f} w-F1 points (the issue allows -0.30)")
        teacher = teacher_bundle(bundle)
        if teacher and f32 is not None:  # the same fusion weights on the encoder the student replaces
            slow = report["dev_weighted_f1"]["teacher_fp32"] = dev_accuracy(teacher, False, device)
            if slow is not None:
                print(f"distilled text encoder vs its teacher ({teacher}): {f32 - slow:+.2f} w-F1 points")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    print(json.dumps(report, indent=1))
    if args.http:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "api_cpu.py"), "--model", bundle, "--clients-list", "1,4,16"]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
