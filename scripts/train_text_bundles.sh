#!/usr/bin/env bash
# The fine-tuned, context-aware text stage (issue #6) and the eight meld7/iemocap6 bundles trained on it:
# the exact commands behind docs/results.md. Each bundle carries a copy of its extractor (text_encoder/).
# Usage: scripts/train_text_bundles.sh [finetune|bundles|conversation|distill|all] [JOBS]   (1 CPU thread per job)
# "conversation" (issue 13): the conversation-mode extractor (each turn encoded once), warm-started from
# the pair-mode one (finetune stage), and sdt-meld7-conv on it.
# "distill" (issue 13): a windowed conversation-mode student distilled from the pair-mode extractor
# (warm-started from the conversation stage's), and the default bundle sdt-meld7-fast trained on it.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
WHAT=${1:-all}
JOBS=${2:-2}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p logs
if [ "$WHAT" = finetune ] || [ "$WHAT" = all ]; then
  cat <<EOC | xargs -P "$JOBS" -I{} bash -c '{}'
.venv/bin/merc finetune-text --data $D/meld7 --out weights/text/meld7-minilm-ctx --past 2 --future 0 --max-length 80 --epochs 3 > logs/ft-meld7.log 2>&1
.venv/bin/merc finetune-text --data $D/iemocap6 --out weights/text/iemocap6-minilm-ctx --past 3 --future 0 --max-length 96 --epochs 3 > logs/ft-iemocap6.log 2>&1
EOC
fi
if [ "$WHAT" = conversation ] || [ "$WHAT" = all ]; then
  .venv/bin/merc finetune-text --data $D/meld7 --out weights/text/meld7-minilm-conv-warm --init weights/text/meld7-minilm-ctx \
    --mode conversation --past 2 --chunk 4 --turn-tokens 48 --epochs 3 --lr 2e-4 --head-lr 1e-3 > logs/ft-meld7-conv.log 2>&1
  .venv/bin/merc train sdt --data $D/meld7 --out weights/sdt-meld7-conv --text-encoder weights/text/meld7-minilm-conv-warm \
    --device cpu --lr 5e-5 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --set model.dropout=0.6 \
    --quiet > logs/sdt-meld7-conv.log 2>&1
fi
if [ "$WHAT" = bundles ] || [ "$WHAT" = all ]; then
  M=weights/text/meld7-minilm-ctx
  I=weights/text/iemocap6-minilm-ctx
  cat <<EOC | xargs -P "$JOBS" -I{} bash -c '{}'
.venv/bin/merc train sdt --data $D/meld7 --out weights/sdt-meld7 --text-encoder $M --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --quiet > logs/sdt-meld7.log 2>&1
.venv/bin/merc train summer --data $D/meld7 --out weights/summer-meld7 --text-encoder $M --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 30 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-meld7.log 2>&1
.venv/bin/merc train dmd --data $D/meld7 --out weights/dmd-meld7 --text-encoder $M --device cpu --patience 10 --epochs 40 --quiet > logs/dmd-meld7.log 2>&1
.venv/bin/merc train iteach --data $D/meld7 --out weights/iteach-meld7 --text-encoder $M --device cpu --patience 15 --quiet > logs/iteach-meld7.log 2>&1
.venv/bin/merc train sdt --data $D/iemocap6 --out weights/sdt-iemocap6 --text-encoder $I --device cpu --patience 20 --quiet > logs/sdt-iemocap6.log 2>&1
.venv/bin/merc train summer --data $D/iemocap6 --out weights/summer-iemocap6 --text-encoder $I --device cpu --patience 15 --set model.hidden=128 --set model.n_layers=2 --quiet > logs/summer-iemocap6.log 2>&1
.venv/bin/merc train dmd --data $D/iemocap6 --out weights/dmd-iemocap6 --text-encoder $I --device cpu --patience 20 --quiet > logs/dmd-iemocap6.log 2>&1
.venv/bin/merc train iteach --data $D/iemocap6 --out weights/iteach-iemocap6 --text-encoder $I --device cpu --patience 25 --quiet > logs/iteach-iemocap6.log 2>&1
EOC
fi
if [ "$WHAT" = distill ] || [ "$WHAT" = all ]; then
  .venv/bin/merc finetune-text --data $D/meld7 --out weights/text/meld7-minilm-conv-distill \
    --init weights/text/meld7-minilm-conv-warm --distill weights/text/meld7-minilm-ctx --distill-weight 20 \
    --mode conversation --windowed --past 2 --chunk 4 --turn-tokens 48 --epochs 4 --lr 5e-4 --head-lr 1e-3 \
    --evals-per-epoch 2 --patience 4 > logs/ft-meld7-distill.log 2>&1
  .venv/bin/merc train sdt --data $D/meld7 --out weights/sdt-meld7-fast --text-encoder weights/text/meld7-minilm-conv-distill \
    --device cpu --lr 1e-4 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --quiet > logs/sdt-meld7-fast.log 2>&1
fi
