"""Print the mosi2 modality-ablation table (dev acc / w-F1) from runs/ablation/ and weights/."""

import json
from pathlib import Path

COLUMNS = ["text", "audio", "visual", "audio+visual"]


def cell(path: Path) -> str:
    if not path.exists():
        return "—"
    dev = json.loads(path.read_text())["dev_metrics"]
    return f"{dev['accuracy']:.2f} / {dev['weighted_f1']:.2f}"


print("| arch | " + " | ".join(COLUMNS) + " | text+audio+visual (bundle) |")
print("|---|" + "---|" * (len(COLUMNS) + 1))
for arch in ("sdt", "summer", "dmd", "iteach"):
    cells = [cell(Path("runs/ablation") / f"{arch}-{m}" / "manifest.json") for m in COLUMNS]
    cells.append(cell(Path("weights") / f"{arch}-mosi2" / "manifest.json"))
    print(f"| {arch} | " + " | ".join(cells) + " |")
