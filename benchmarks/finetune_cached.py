"""CPU cost of a fine-tune epoch with and without cached lower-layer states (``--cache-lower``).

Measured in CPU seconds of this process (``time.process_time``, one thread), which a machine shared
with other jobs inflates far less than wall time. On a seeded sample of ``--conversations`` train
conversations (and ``--dev`` dev ones) it times: building the cache (lower layers, eval mode), then
``--batches`` training batches over the cache (top layers + head: forward, backward, AdamW step) and
``--batches`` uncached ones (the whole encoder forward), and one dev prediction each way. Per-token
figures are scaled to the whole train split (every chunk alignment's tokens counted by tokenizing
it) to give seconds per epoch and the cache's cost.

Run::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/finetune_cached.py --data ../shared/data/iemocap6 \\
        --base mpnet-base-v2 --past 8 --chunk 8 --windowed --lora-layers 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.data import read_dataset_info, read_jsonl  # noqa: E402
from models.text_finetune import ContextWindow, FineTuneConfig, _ChunkTask, _initial_model  # noqa: E402


def _labels(convs: list, labels: list[str]) -> list[list[int]]:
    index = {label: i for i, label in enumerate(labels)}
    return [[index.get(u.label, -1) if u.label else -1 for u in c.utterances] for c in convs]


def _train_batches(model: Any, batches: list, n: int) -> tuple[float, int]:
    """CPU seconds of ``n`` training steps over ``batches`` (forward, loss, backward, AdamW), and their turns."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    turns, started = 0, time.process_time()
    for forward, ys, _ in batches[:n]:
        _, logits = forward(model, "cpu")
        loss = loss_fn(logits.float(), torch.tensor(ys))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        turns += len(ys)
    return time.process_time() - started, turns


def _tokens_per_alignment(task: _ChunkTask, offsets: list[int]) -> tuple[list[int], int]:
    """Input tokens of the whole train split's chunks per alignment ``offsets``, and the uncached epoch's batches."""
    from models.text_cached import _Offset
    from models.text_chunks import training_chunks

    w = task.cfg.window
    out = []
    for offset in offsets:
        chunks, _ = training_chunks(*task.train, task.cls_id, task.sep_id, w.past, w.chunk, _Offset(offset))
        out.append(sum(len(c.input_ids) for c in chunks))
    return out, task.n_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--base", default="mpnet-base-v2")
    ap.add_argument("--past", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--turn-tokens", type=int, default=48)
    ap.add_argument("--windowed", action="store_true")
    ap.add_argument("--lora-layers", type=int, default=2)
    ap.add_argument("--alignments", type=int, default=2, help="cached alignments of the full run (for its cost)")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--dev", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    from models.text_cached import CachedChunkTask, alignment_offsets
    from models.text_finetune import conversation_inputs
    from service.features.text import _resolve_source

    torch.manual_seed(args.seed)
    labels = list(read_dataset_info(args.data)["labels"])
    train_all, dev_all = read_jsonl(args.data / "train.jsonl"), read_jsonl(args.data / "dev.jsonl")
    rng = random.Random(args.seed)
    train, dev = rng.sample(train_all, args.conversations), rng.sample(dev_all, args.dev)
    window = ContextWindow(
        past=args.past, mode="conversation", chunk=args.chunk, turn_tokens=args.turn_tokens, windowed=args.windowed
    )
    source = _resolve_source(args.base, None)
    tokenizer = AutoTokenizer.from_pretrained(str(source.locate()), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(source.locate()), local_files_only=True)
    cfg = FineTuneConfig(window=window, lora_layers=args.lora_layers, cache_lower=True, cache_alignments=1)
    model = _initial_model(encoder, source.dim, len(labels), cfg)

    def split(convs: list) -> tuple[list, list]:
        return conversation_inputs(convs, window), _labels(convs, labels)

    report: dict[str, Any] = {"threads": torch.get_num_threads(), "base": args.base, "window": window.to_dict()}
    started = time.process_time()
    cached = CachedChunkTask(model, tokenizer, split(train), split(dev), cfg, None, "cpu", print)
    cache_tokens = sum(len(c.input_ids) for c in cached.chunks) + sum(len(c.input_ids) for c in cached.dev_chunks)
    report["cache_cpu_s_per_1k_tokens"] = round(1000 * (time.process_time() - started) / cache_tokens, 3)
    plain = _ChunkTask(tokenizer, split(train), split(dev), cfg)
    t_cached, n_cached = _train_batches(model, cached.epoch(random.Random(1)), args.batches)
    t_plain, n_plain = _train_batches(model, plain.epoch(random.Random(1)), args.batches)
    for name, task in (("dev_cached", cached), ("dev_full", plain)):
        t0 = time.process_time()
        task.dev_predict(model, "cpu", False)
        report[f"{name}_cpu_s_per_turn"] = round((time.process_time() - t0) / sum(map(len, task.dev[1])), 4)
    report["train_cpu_s_per_turn"] = {"cached": round(t_cached / n_cached, 4), "uncached": round(t_plain / n_plain, 4)}
    full = _ChunkTask(tokenizer, split(train_all), split(dev_all[:1]), cfg)
    tokens, batches = _tokens_per_alignment(full, alignment_offsets(args.chunk, args.alignments))
    turns = sum(len(row) for row in full.train[1])
    report["full_split"] = {"turns": turns, "batches_per_epoch": batches, "tokens_per_alignment": tokens}
    mb = [n * encoder.config.hidden_size * 2 / 2**20 for n in tokens]
    report["cache_float16_mb"] = round(sum(mb), 1)
    report["cache_cpu_s"] = round(sum(tokens) * report["cache_cpu_s_per_1k_tokens"] / 1000, 1)
    report["epoch_cpu_s"] = {k: round(v * turns, 1) for k, v in report["train_cpu_s_per_turn"].items()}
    dev_turns = sum(len(c.utterances) for c in dev_all)
    report["dev_eval_cpu_s"] = {
        "cached": round(report["dev_cached_cpu_s_per_turn"] * dev_turns, 1),
        "full": round(report["dev_full_cpu_s_per_turn"] * dev_turns, 1),
    }
    report["sampled"] = {"conversations": args.conversations, "batches": args.batches, "seed": args.seed}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
