#!/usr/bin/env bash
# The media default bundle weights/sdt-meld7-av (text + audio, MELD's seven labels): the exact commands behind
# docs/readings.md "The media bundle". Speech sessions of ravdess8 and emodb7 get ComParE functionals from their media
# (merc extract), then one SDT model trains on meld7's text conversations and those sessions' audio with the text
# default's recipe (sdt-meld7-fast: its extractor, lr 1e-4, batch 16, patience 8, temperature 8; hidden 448 keeps it at 22 MB), then
# scripts/fused_dev.py measures it on dev. ARCH=iteach trains the earlier ITEACH-Net variant instead.
# Usage: scripts/train_media_bundle.sh [OUT]   (1 CPU thread; ~20 min on an idle core once meld7's text is encoded)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
M=${MERC_MEDIA:-../shared/media}
F=${MERC_FEATURES:-/tmp/merc-audio-cache}
ARCH=${ARCH:-sdt}
OUT=${1:-weights/$ARCH-meld7-av}
MAP=calm=neutral,happy=joy,happiness=joy,sad=sadness,angry=anger,fearful=fear,surprised=surprise,boredom=
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for ds in ravdess8 emodb7; do  # resumable: a finished folder is skipped
  .venv/bin/merc extract --data "$D/$ds" --media "$M/$ds" --out "$F/$ds-compare2016" --modalities audio \
    --audio compare2016 --device cpu
done
if [ "$ARCH" = sdt ]; then
  RECIPE=(--lr 1e-4 --batch-size 16 --patience 8 --epochs 40 --set model.temperature=8 --set model.hidden=448)
else
  RECIPE=(--patience 10)
fi
.venv/bin/merc train "$ARCH" --data "$D/meld7" --data "$F/ravdess8-compare2016" --data "$F/emodb7-compare2016" \
  --label-map "$MAP" --data-modalities ravdess8=audio --data-modalities emodb7=audio --modalities text,audio \
  --text-encoder weights/text/meld7-minilm-conv-distill --speaker-norm audio --out "$OUT" --device cpu "${RECIPE[@]}"
.venv/bin/python scripts/fused_dev.py --bundle "$OUT" --text meld7="$D/meld7/dev.jsonl" \
  --speech ravdess8="$F/ravdess8-compare2016/dev.jsonl" --speech emodb7="$F/emodb7-compare2016/dev.jsonl" \
  --label-map "$MAP"
