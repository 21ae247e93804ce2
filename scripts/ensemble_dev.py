"""Which ensembles pay on dev: every subset of the given bundles, scored by the mean of their distributions.

Each bundle reads the file once, as `merc evaluate` reads it (its own features and transform); then every
subset of two or more members is scored on the mean of its members' per-utterance distributions, which is
what `merc ensemble` would ship. Prints one JSON line per subset, best weighted F1 first, then the single
bundles; `--out` keeps the table. Choose on dev (or on cross-validation folds), never on test.

    .venv/bin/python scripts/ensemble_dev.py --data ../shared/data/meld7/dev.jsonl \\
        --bundle weights/sdt-meld7-fast --bundle weights/sdt-meld7 --bundle weights/dmd-meld7
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.bundle import read_manifest
from models.data import read_jsonl
from models.ensemble import mean_probabilities
from models.metrics import SUMMARY_KEYS
from models.train import predict, probability_metrics, resolve_device
from service.offline.evaluation import encoded_for_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a labelled JSONL file (dev)")
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="a bundle folder (repeat)")
    parser.add_argument("--max-size", type=int, default=5, help="largest subset scored")
    parser.add_argument("--out", type=Path, help="write the table here as JSON")
    args = parser.parse_args()
    dev = resolve_device("cpu")
    convs = read_jsonl(args.data)
    labels = read_manifest(args.bundle[0])["labels"]
    probs, encoded = {}, None
    for bundle in args.bundle:
        model, enc = encoded_for_bundle(bundle, convs, labels, dev, progress=False)
        probs[bundle.name] = predict(model, enc, device=dev)
        encoded = encoded or enc
        print(f"read {bundle.name}", file=sys.stderr)
    rows = []
    for size in range(1, min(args.max_size, len(probs)) + 1):
        for names in itertools.combinations(probs, size):
            metrics = probability_metrics(mean_probabilities([probs[n] for n in names]), encoded, labels)
            rows.append({"members": list(names), **{k: metrics[k] for k in SUMMARY_KEYS if k in metrics}})
    rows.sort(key=lambda r: -r["weighted_f1"])
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"data": str(args.data), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
