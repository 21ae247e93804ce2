"""UME curves: weighted F1 of several bundles on one file at missing rates 0..0.7, one PNG.

    python scripts/ume_compare.py --data ../shared/data/mosi2/dev.jsonl --out docs/figures/ume_mosi2_dev.png \
        weights/iteach-mosi2-random weights/sdt-mosi2 ...
"""

import argparse
import json
from pathlib import Path

from models.report import plot_missing_curve
from service.offline.evaluation import evaluate_bundle

RATES = [round(0.1 * i, 1) for i in range(8)]

ap = argparse.ArgumentParser()
ap.add_argument("--data", type=Path, required=True)
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("bundles", type=Path, nargs="+")
args = ap.parse_args()
curves, table = {}, {}
for bundle in args.bundles:
    m = evaluate_bundle(bundle, args.data, Path("/tmp/ume") / bundle.name, RATES, "cpu", args.seed, progress=False)
    curves[bundle.name] = {float(r): v["weighted_f1"] for r, v in m["missing_rates"].items()}
    table[bundle.name] = (curves[bundle.name], m["missing_rate_average"]["weighted_f1"])
args.out.parent.mkdir(parents=True, exist_ok=True)
plot_missing_curve(curves, args.out, "Weighted F1")
print("| bundle | " + " | ".join(f"{r:.1f}" for r in RATES) + " | UME avg |")
print("|---|" + "---|" * (len(RATES) + 1))
for name, (curve, avg) in table.items():
    print(f"| `{name}` | " + " | ".join(f"{curve[r]:.2f}" for r in RATES) + f" | {avg:.2f} |")
print(json.dumps({k: v[1] for k, v in table.items()}))
