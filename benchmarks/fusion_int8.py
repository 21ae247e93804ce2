"""Int8 fusion models on CPU: dev accuracy drift and scoring time per bundle (``MERC_FUSION_INT8``).

For each bundle (default: every bundle in weights/ whose dev split is in ../shared/data): the dev
features are computed once (the bundle's own extractors, through the service's code path), then the
conversations are scored by the fp32 fusion model and by its int8 copy (``models.common.int8_linear``,
what ``service.inference.predictor.Predictor`` runs on CPU by default). Prints weighted F1 (and UAR
where the bundle records it) for both, the drift, and the p50 milliseconds of scoring a 21-turn
conversation, 1 torch thread.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion_int8.py [--bundles sdt-meld7,dmd-meld7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.data import read_jsonl  # noqa: E402
from models.metrics import classification_metrics  # noqa: E402


def _bundles(names: str | None) -> list[Path]:
    if names:
        return [ROOT / "weights" / n for n in names.split(",")]
    return sorted(p.parent for p in (ROOT / "weights").glob("*/manifest.json"))


def _score_all(predictor, convs, feats) -> tuple[np.ndarray, np.ndarray]:
    ys, preds = [], []
    index = {label: i for i, label in enumerate(predictor.labels)}
    for conv, f in zip(convs, feats, strict=True):
        probs, _ = predictor.probabilities(conv, f)
        for u, p in zip(conv.utterances, probs, strict=True):
            if u.label in index:
                ys.append(index[u.label])
                preds.append(int(p.argmax()))
    return np.array(ys), np.array(preds)


def _p50_ms(predictor, conv, f, n: int = 30) -> float:
    for _ in range(3):
        predictor.probabilities(conv, f)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        predictor.probabilities(conv, f)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", default=None, help="comma-separated names in weights/ [all with a dev split here]")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from service.inference.pipeline import extract_features_many
    from service.inference.predictor import Predictor

    report = {}
    for path in _bundles(args.bundles):
        manifest = json.loads((path / "manifest.json").read_text())
        dev = ROOT.parent / "shared" / "data" / manifest["dataset"]["name"] / "dev.jsonl"
        if not dev.is_file():
            print(f"{path.name}: skipped ({dev} absent)")
            continue
        fp32, int8 = Predictor(path, "cpu", int8=False), Predictor(path, "cpu", int8=True)
        media = [m for m, e in fp32.feature_spec.items() if m != "text" and e.get("version") != "inline"]
        if media:  # computed from media files the dataset folder does not hold
            print(f"{path.name}: skipped (its {'+'.join(media)} features come from media)")
            continue
        convs = read_jsonl(dev)
        sets, _ = extract_features_many(convs, fp32.feature_spec, readings=False, device="cpu")
        feats = [dict(s) for s in sets]
        row = {}
        for name, pred in (("fp32", fp32), ("int8", int8)):
            y, p = _score_all(pred, convs, feats)
            m = classification_metrics(y, p, fp32.labels)
            row[name] = {"weighted_f1": m["weighted_f1"], "uar": m.get("uar")}
        long = max(range(len(convs)), key=lambda i: len(convs[i].utterances) if len(convs[i].utterances) <= 21 else -1)
        row["ms_fp32"] = _p50_ms(fp32, convs[long], feats[long])
        row["ms_int8"] = _p50_ms(int8, convs[long], feats[long])
        row["turns"] = len(convs[long].utterances)
        drift = row["int8"]["weighted_f1"] - row["fp32"]["weighted_f1"]
        print(
            f"{path.name}: dev w-F1 fp32 {row['fp32']['weighted_f1']:.2f} int8 {row['int8']['weighted_f1']:.2f} "
            f"(drift {drift:+.2f}); scoring {row['turns']} turns p50 {row['ms_fp32']:.1f} -> {row['ms_int8']:.1f} ms",
            flush=True,
        )
        report[path.name] = row
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
