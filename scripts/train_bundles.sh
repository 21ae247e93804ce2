#!/usr/bin/env bash
# Train every committed bundle (the exact commands behind docs/results.md).
# Usage: scripts/train_bundles.sh [JOBS]   (runs JOBS trainings at a time, 1 CPU thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
JOBS=${1:-2}
export OMP_NUM_THREADS=1
mkdir -p logs
cat <<EOC | xargs -P "$JOBS" -I{} bash -c '{}'
.venv/bin/merc train sdt --data $D/meld7 --out weights/sdt-meld7 --text-encoder mpnet-base-v2 --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --quiet > logs/sdt-meld7.log 2>&1
.venv/bin/merc train iteach --data $D/iemocap6 --out weights/iteach-iemocap6 --text-encoder mpnet-base-v2 --device cpu --patience 25 --quiet > logs/iteach-iemocap6.log 2>&1
.venv/bin/merc train iteach --data $D/meld7 --out weights/iteach-meld7 --text-encoder mpnet-base-v2 --device cpu --patience 15 --quiet > logs/iteach-meld7.log 2>&1
.venv/bin/merc train dmd --data $D/iemocap6 --out weights/dmd-iemocap6 --text-encoder mpnet-base-v2 --device cpu --patience 20 --quiet > logs/dmd-iemocap6.log 2>&1
.venv/bin/merc train dmd --data $D/meld7 --out weights/dmd-meld7 --text-encoder mpnet-base-v2 --device cpu --patience 10 --epochs 40 --quiet > logs/dmd-meld7.log 2>&1
.venv/bin/merc train summer --data $D/iemocap6 --out weights/summer-iemocap6 --text-encoder mpnet-base-v2 --device cpu --patience 15 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-iemocap6.log 2>&1
.venv/bin/merc train summer --data $D/meld7 --out weights/summer-meld7 --text-encoder mpnet-base-v2 --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 30 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-meld7.log 2>&1
.venv/bin/merc train sdt --data $D/iemocap6 --out weights/sdt-iemocap6 --text-encoder mpnet-base-v2 --device cpu --patience 20 --quiet > logs/sdt-iemocap6.log 2>&1
.venv/bin/merc train sdt --data $D/mosi2 --out weights/sdt-mosi2 --device cpu --patience 20 --set model.hidden=256 --quiet > logs/sdt-mosi2.log 2>&1
.venv/bin/merc train iteach --data $D/mosi2 --out weights/iteach-mosi2-random --device cpu --missing random --patience 20 --quiet > logs/iteach-mosi2-random.log 2>&1
.venv/bin/merc train dmd --data $D/mosi2 --out weights/dmd-mosi2 --device cpu --patience 20 --quiet > logs/dmd-mosi2.log 2>&1
.venv/bin/merc train iteach --data $D/mosi2 --out weights/iteach-mosi2 --device cpu --patience 20 --quiet > logs/iteach-mosi2.log 2>&1
.venv/bin/merc train summer --data $D/mosi2 --out weights/summer-mosi2 --device cpu --patience 15 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-mosi2.log 2>&1
EOC
