#!/usr/bin/env bash
# Train the committed mosi2 bundles and the frozen-MPNet reference sdt-meld7-mpnet (the exact commands
# behind docs/results.md). The meld7/iemocap6 bundles on fine-tuned text: scripts/train_text_bundles.sh.
# Usage: scripts/train_bundles.sh [JOBS]   (runs JOBS trainings at a time, 1 CPU thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
JOBS=${1:-2}
export OMP_NUM_THREADS=1
mkdir -p logs
cat <<EOC | xargs -P "$JOBS" -I{} bash -c '{}'
.venv/bin/merc train sdt --data $D/meld7 --out weights/sdt-meld7-mpnet --text-encoder mpnet-base-v2 --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --quiet > logs/sdt-meld7-mpnet.log 2>&1
.venv/bin/merc train sdt --data $D/mosi2 --out weights/sdt-mosi2 --device cpu --patience 20 --set model.hidden=256 --quiet > logs/sdt-mosi2.log 2>&1
.venv/bin/merc train iteach --data $D/mosi2 --out weights/iteach-mosi2-random --device cpu --missing random --patience 20 --quiet > logs/iteach-mosi2-random.log 2>&1
.venv/bin/merc train dmd --data $D/mosi2 --out weights/dmd-mosi2 --device cpu --patience 20 --quiet > logs/dmd-mosi2.log 2>&1
.venv/bin/merc train iteach --data $D/mosi2 --out weights/iteach-mosi2 --device cpu --patience 20 --quiet > logs/iteach-mosi2.log 2>&1
.venv/bin/merc train summer --data $D/mosi2 --out weights/summer-mosi2 --device cpu --patience 15 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-mosi2.log 2>&1
EOC
