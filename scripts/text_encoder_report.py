"""A fine-tuned text extractor on its own: train vs dev weighted F1 of its classifier, and a window ablation.

The train/dev gap says how much more confident the train-split features are than unseen ones (what
the fusion models trained on them inherit). The ablation re-encodes dev with other context windows
through the same adapter (no speaker, no context, 1..3 past turns, + 1 future turn): how much the
encoder leans on each part of its input. It is an inference-time ablation of one fine-tune, not a
retraining per window (which the CPU budget of this project does not allow); docs/results.md says so.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/text_encoder_report.py weights/text/meld7-minilm-ctx \\
        --data ../shared/data/meld7 [--no-train] [--out docs/results/meld7-minilm-ctx.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from models.data import read_dataset_info, read_jsonl  # noqa: E402
from models.metrics import classification_metrics  # noqa: E402
from service.features.finetuned import FinetunedTextEncoder, spec_entry  # noqa: E402


def scores(encoder: FinetunedTextEncoder, convs, labels: list[str]) -> dict[str, float]:
    """Weighted F1 / accuracy of the extractor's own head on ``convs``."""
    vectors = encoder.conversation_vectors(convs, future_known=True)
    y, x = [], []
    for conv, vecs in zip(convs, vectors, strict=True):
        for u, v in zip(conv.utterances, vecs, strict=True):
            if v is not None and u.label in labels:
                y.append(labels.index(u.label))
                x.append(v)
    head = encoder.load()._model.head.float().cpu()
    with torch.no_grad():
        pred = head(torch.from_numpy(np.stack(x))).argmax(1).numpy()
    m = classification_metrics(np.array(y), pred, labels)
    return {"weighted_f1": m["weighted_f1"], "accuracy": m["accuracy"], "n": m["n"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("extractor", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--no-train", action="store_true", help="skip the train-split score")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    labels = list(read_dataset_info(args.data)["labels"])
    entry = spec_entry(args.extractor, args.extractor.name)
    base = FinetunedTextEncoder(entry, args.extractor, "cpu")
    dev = read_jsonl(args.data / "dev.jsonl")
    report: dict = {"extractor": str(args.extractor), "window": entry["context"], "dev": scores(base, dev, labels)}
    print(json.dumps({"dev": report["dev"]}), flush=True)
    if not args.no_train:
        report["train"] = scores(base, read_jsonl(args.data / "train.jsonl"), labels)
        print(json.dumps({"train": report["train"]}), flush=True)
    window = base.window
    variants = {
        "no speaker": replace(window, speaker=False),
        "no context": replace(window, past=0, future=0),
        "past 1": replace(window, past=1, future=0),
        "past 2": replace(window, past=2, future=0),
        "past 3": replace(window, past=3, future=0),
        f"past {window.past} + future 1": replace(window, future=1),
    }
    report["ablation_dev"] = {}
    for name, w in variants.items():
        enc = FinetunedTextEncoder({**entry, "context": w.to_dict()}, args.extractor, "cpu", use_disk_cache=False)
        enc._model, enc._tokenizer = base.load()._model, base._tokenizer  # same weights, other inputs
        report["ablation_dev"][name] = scores(enc, dev, labels)
        print(json.dumps({name: report["ablation_dev"][name]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
