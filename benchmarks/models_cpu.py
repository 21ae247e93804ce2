"""Training seconds per epoch and inference utterances per second, per architecture, on CPU.

Synthetic conversations shaped like the real datasets (MELD-like text-only 384-d,
~10 utterances per conversation; MOSI-like trimodal 100/73/100-d, ~23 utterances),
so the figures do not need ../shared. Run:

    .venv/bin/python benchmarks/models_cpu.py [--convs 200] [--threads 1] [--paper-size] [--bundles]

By default each architecture runs at the size its bundles are trained at (see
scripts/train_bundles.sh); ``--paper-size`` uses the papers' defaults instead (SUMMER
then has 150-350M parameters: minutes per epoch). ``--bundles`` also times every
bundle under weights/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from models.bundle import load_bundle
from models.common import MODALITIES, FusionModel
from models.data import EncodedConversation
from models.missing import MissingSampler
from models.registry import create_model, list_models
from models.train import TrainConfig, _optimizer, _train_epoch, predict

# Overrides used for the committed bundles, per (architecture, shape).
TRAINED_SIZE = {
    ("sdt", "mosi-trimodal"): {"hidden": 256},
    ("summer", "meld-text"): {"hidden": 128, "n_layers": 2},
    ("summer", "mosi-trimodal"): {"hidden": 128, "n_layers": 2},
}

SHAPES = {
    "meld-text": ({"text": 384}, 7, 10),
    "mosi-trimodal": ({"text": 100, "audio": 73, "visual": 100}, 2, 23),
}


def synthetic(dims: dict[str, int], n_classes: int, mean_len: int, n_convs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    convs = []
    for i in range(n_convs):
        n = int(rng.integers(max(1, mean_len // 2), mean_len * 3 // 2 + 1))
        present = np.zeros((n, len(MODALITIES)), dtype=bool)
        for m in dims:
            present[:, MODALITIES.index(m)] = True
        convs.append(
            EncodedConversation(
                f"c{i}",
                {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in dims.items()},
                present,
                rng.integers(0, 2, n),
                rng.integers(0, n_classes, n),
            )
        )
    return convs


def time_model(model: FusionModel, convs, batch_size: int) -> tuple[float, float]:
    cfg = TrainConfig(batch_size=batch_size, device="cpu")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    per_epoch = 0.0
    for stage in model.stages:
        model.set_stage(stage)
        opt = _optimizer(model, cfg)
        t0 = time.perf_counter()
        _train_epoch(model, convs, cfg, opt, MissingSampler(), 0, None, "cpu", rng, gen)
        per_epoch += time.perf_counter() - t0
    n_utts = sum(len(c) for c in convs)
    predict(model, convs[:8], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    predict(model, convs, batch_size=32)
    return per_epoch, n_utts / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--convs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paper-size", action="store_true")
    ap.add_argument("--bundles", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape, (dims, n_classes, mean_len) in SHAPES.items():
        convs = synthetic(dims, n_classes, mean_len, args.convs)
        for arch in list_models():
            torch.manual_seed(0)
            size = {} if args.paper_size else TRAINED_SIZE.get((arch, shape), {})
            model = create_model(arch, input_dims=dims, n_classes=n_classes, **size)
            epoch_s, ups = time_model(model, convs, batch_size=16)
            rows.append(
                dict(
                    model=f"{arch} ({'paper' if args.paper_size else 'trained'} size)",
                    data=shape,
                    params=sum(p.numel() for p in model.parameters()),
                    train_s_per_epoch=round(epoch_s, 2),
                    infer_utt_per_s=round(ups),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    if args.bundles:
        for manifest_path in sorted(Path("weights").glob("*/manifest.json")):
            model, manifest = load_bundle(manifest_path.parent)
            dims = manifest["config"]["input_dims"]
            convs = synthetic(
                dims, len(manifest["labels"]), 10 if "text" in dims and len(dims) == 1 else 23, args.convs
            )
            epoch_s, ups = time_model(model, convs, batch_size=manifest["train_config"]["batch_size"])
            rows.append(
                dict(
                    model=manifest_path.parent.name,
                    data="synthetic",
                    params=sum(p.numel() for p in model.parameters()),
                    train_s_per_epoch=round(epoch_s, 2),
                    infer_utt_per_s=round(ups),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.convs} conversations per epoch, {args.threads} CPU threads")
    print(f"{'model':32} {'data':14} {'params':>10} {'train s/epoch':>14} {'infer utt/s':>12}")
    for r in rows:
        print(
            f"{r['model']:32} {r['data']:14} {r['params']:>10} {r['train_s_per_epoch']:>14} {r['infer_utt_per_s']:>12}"
        )


if __name__ == "__main__":
    main()
