"""Fine-tuned text encoder on CPU: fine-tuning seconds per epoch, and text-only scoring latency.

Prints

* the seconds per epoch of the committed fine-tunes (from each extractor's finetune.json, measured
  while they trained) and a fresh measurement: ``--steps`` LoRA training batches on meld7 train
  windows, extrapolated to one epoch of meld7 train (skipped without ../shared);
* text-only latency of the service's scoring path (features + fusion model, in process, fresh
  sentences, so no embedding-cache hit): a 20-utterance conversation and an append of 1 turn in the
  context of 20, p50/p99 over ``--n`` runs, for each ``--bundles`` (default: the new default bundle
  and the previous frozen-MPNet one, when present).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_finetune.py [--threads 1] [--n 20] [--steps 20]

HTTP-level figures of the same bundles: ``benchmarks/api_cpu.py --model NAME``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.data import Conversation, Utterance, read_jsonl  # noqa: E402

WORDS = ["i", "you", "we", "they", "really", "never", "always", "love", "hate", "think", "know", "feel", "want", "need", "this", "that", "great", "awful", "fine"]  # noqa: E501
MELD = ROOT.parent / "shared" / "data" / "meld7"


def fresh_conversation(n: int, rng: random.Random) -> Conversation:
    """``n`` turns of new random sentences between two speakers."""
    utts = [
        Utterance(id=f"u{i}", speaker=["user", "bot"][i % 2], text=" ".join(rng.choices(WORDS, k=rng.randint(5, 14))))
        for i in range(n)
    ]
    return Conversation(id="bench", utterances=utts)


def committed_epochs() -> None:
    """The seconds per epoch each committed extractor recorded while it trained."""
    for path in sorted((ROOT / "weights" / "text").glob("*/finetune.json")):
        meta = json.loads(path.read_text())
        print(
            f"committed fine-tune {path.parent.name}: {meta.get('seconds_per_epoch')} s/epoch "
            f"({meta.get('torch_threads')} threads, {meta.get('device')}), best dev w-F1 "
            f"{(meta.get('best_dev') or {}).get('dev_weighted_f1')}"
        )


def measure_epoch(steps: int, past: int, max_length: int) -> None:
    """Time ``steps`` LoRA batches of 16 on meld7 train windows; extrapolate to one epoch."""
    if not MELD.is_dir():
        print("fine-tune timing skipped: ../shared/data/meld7 absent")
        return
    from transformers import AutoModel, AutoTokenizer

    from models.text_finetune import (
        ContextWindow,
        FineTuneConfig,
        TextClassifier,
        conversation_pairs,
        tokenize_pairs,
        wrap_encoder,
    )
    from service.features.text import _resolve_source

    source = _resolve_source("minilm-l6-v2", None)
    tok = AutoTokenizer.from_pretrained(str(source.locate()))
    cfg = FineTuneConfig(window=ContextWindow(past=past, future=0, max_length=max_length))
    model = TextClassifier(
        wrap_encoder(AutoModel.from_pretrained(str(source.locate())), cfg), source.dim, 7, cfg.pooling
    )
    convs = read_jsonl(MELD / "train.jsonl")
    pairs = [p for c in conversation_pairs(convs, cfg.window) for p in c if p]
    random.Random(0).shuffle(pairs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    started = None
    for s in range(steps + 2):
        if s == 2:
            started = time.perf_counter()
        batch = tokenize_pairs(tok, pairs[s * 16 : (s + 1) * 16], max_length)
        _, logits = model(batch)
        logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    per_batch = (time.perf_counter() - started) / steps
    print(
        f"fine-tune minilm-l6-v2 LoRA, past {past}, {max_length} tokens, {torch.get_num_threads()} threads: "
        f"{per_batch:.2f} s/batch of 16 -> {per_batch * len(pairs) / 16:.0f} s per meld7 epoch "
        f"({len(pairs)} utterances)"
    )


def latency(bundle: str, n: int, rng: random.Random) -> None:
    from service.inference.pipeline import extract_features, score
    from service.inference.predictor import Predictor

    predictor = Predictor(bundle, "cpu", ROOT / "weights")
    spec = predictor.feature_spec
    extract_features(fresh_conversation(20, rng), spec, None, "cpu")  # load the encoder
    post, append = [], []
    for _ in range(n):
        conv = fresh_conversation(21, rng)
        head = Conversation(id="b", utterances=conv.utterances[:20])
        t0 = time.perf_counter()
        feats, timings = extract_features(head, spec, None, "cpu")
        score(predictor, head, feats, ["text"], timings)
        post.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        feats, timings = extract_features(conv, spec, None, "cpu", first=20, future_known=False)
        score(predictor, conv, feats, ["text"], timings, future_known=False)
        append.append(time.perf_counter() - t0)
    text = spec["text"]
    print(
        f"{bundle} ({text['extractor']}, context {text.get('context', 'none')}): 20 fresh turns p50 "
        f"{np.percentile(post, 50) * 1000:.0f} ms p99 {np.percentile(post, 99) * 1000:.0f} ms; append 1 turn p50 "
        f"{np.percentile(append, 50) * 1000:.0f} ms p99 {np.percentile(append, 99) * 1000:.0f} ms "
        "(append: only the new turn is encoded, the earlier ones are its context; the fusion model reruns)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=20, help="runs per latency figure")
    ap.add_argument("--steps", type=int, default=20, help="training batches timed (0 skips)")
    ap.add_argument("--bundles", nargs="*", default=None, help="bundles to time [new default, sdt-meld7-mpnet]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    committed_epochs()
    if args.steps:
        measure_epoch(args.steps, past=2, max_length=80)
    from service.settings import Settings

    bundles = args.bundles or [Settings().default_model, "sdt-meld7-mpnet"]
    rng = random.Random(0)
    for bundle in bundles:
        if (ROOT / "weights" / bundle).is_dir() or Path(bundle).is_dir():
            latency(bundle, args.n, rng)
        else:
            print(f"{bundle}: not in weights/, skipped")


if __name__ == "__main__":
    main()
