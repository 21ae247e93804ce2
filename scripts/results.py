"""Print the dev-results table of every bundle under weights/ (for docs/results.md)."""

import json
from pathlib import Path

PAPER = {  # (dataset, arch) -> what the paper reports, see ../shared/reference/models.md
    ("meld7", "sdt"): "67.55 / 66.60 (multimodal, RoBERTa)",
    ("iemocap6", "sdt"): "73.95 / 74.08 (multimodal, RoBERTa)",
    ("meld7", "summer"): "66.49 / 65.32 (text-only, Table 3)",
    ("iemocap6", "summer"): "69.57 / 69.73 (text-only, Table 3)",
    ("mosi2", "dmd"): "84.5 / 84.4 (Acc2/F1, aligned GloVe features)",
    ("iemocap6", "iteach"): "— / 57.30 (UME avg, trimodal, random missing)",
}

rows = []
for path in sorted(Path("weights").glob("*/manifest.json")):
    m = json.loads(path.read_text())
    d, dev = m["dataset"]["name"], m["dev_metrics"]
    feats = ", ".join(f"{k}: {v['extractor']}" for k, v in m["feature_spec"].items() if v["version"] != "inline")
    rows.append(
        f"| `{path.parent.name}` | {m['architecture']} | {d} | {'+'.join(m['modalities'])} | {feats or 'inline'} | "
        f"{dev['accuracy']:.2f} | {dev['weighted_f1']:.2f} | {PAPER.get((d, m['architecture']), '—')} | "
        f"{m['n_parameters'] / 1e6:.2f}M | {m['training_seconds'] / 60:.1f} |"
    )
HEADER = ["bundle", "arch", "data", "modalities", "features", "dev acc", "dev w-F1", "paper (acc / w-F1, test)"]
HEADER += ["params", "train min"]
print("| " + " | ".join(HEADER) + " |")
print("|" + "---|" * len(HEADER))
print("\n".join(rows))
print("\nCommands:\n")
for path in sorted(Path("weights").glob("*/manifest.json")):
    print(f"- `{path.parent.name}`: `{json.loads(path.read_text())['command']}`")
