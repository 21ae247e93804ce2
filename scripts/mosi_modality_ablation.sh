#!/usr/bin/env bash
# mosi2: each architecture trained on each single modality and on audio+visual (same settings
# as its trimodal bundle), evaluated on dev beside the trimodal bundle. Bundles go to runs/ablation/.
# Usage: scripts/mosi_modality_ablation.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
JOBS=${1:-2}
export OMP_NUM_THREADS=1
mkdir -p runs/ablation
for arch in sdt summer dmd iteach; do
  extra=""
  [ "$arch" = sdt ] && extra="--set model.hidden=256"
  [ "$arch" = summer ] && extra="--set model.hidden=128 --set model.n_layers=2 --patience 15"
  for m in text audio visual audio,visual; do
    echo ".venv/bin/merc train $arch --data $D/mosi2 --modalities $m --out runs/ablation/$arch-${m/,/+} --device cpu --patience 20 $extra --quiet > runs/ablation/$arch-${m/,/+}.log 2>&1"
  done
done | xargs -P "$JOBS" -I{} bash -c '{}'
