#!/usr/bin/env bash
# The media default bundle weights/iteach-meld7-av (text + audio, MELD's seven labels): the exact commands behind
# docs/readings.md "The media bundle". Speech sessions of ravdess8 and emodb7 get ComParE functionals from their media
# (merc extract), then one ITEACH model trains on meld7's text conversations and those sessions' audio, then
# scripts/fused_dev.py measures it on dev. Usage: scripts/train_media_bundle.sh [OUT]   (1 CPU thread; ~1 h on a busy
# 2-core machine, ~10 min on an idle one)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${MERC_DATA:-../shared/data}
M=${MERC_MEDIA:-../shared/media}
F=${MERC_FEATURES:-/tmp/merc-audio-cache}
OUT=${1:-weights/iteach-meld7-av}
MAP=calm=neutral,happy=joy,happiness=joy,sad=sadness,angry=anger,fearful=fear,surprised=surprise,boredom=
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for ds in ravdess8 emodb7; do  # resumable: a finished folder is skipped
  .venv/bin/merc extract --data "$D/$ds" --media "$M/$ds" --out "$F/$ds-compare2016" --modalities audio \
    --audio compare2016 --device cpu
done
.venv/bin/merc train iteach --data "$D/meld7" --data "$F/ravdess8-compare2016" --data "$F/emodb7-compare2016" \
  --label-map "$MAP" --data-modalities ravdess8=audio --data-modalities emodb7=audio --modalities text,audio \
  --text-encoder weights/text/meld7-minilm-conv-distill --speaker-norm audio --out "$OUT" --device cpu --patience 10
.venv/bin/python scripts/fused_dev.py --bundle "$OUT" --text meld7="$D/meld7/dev.jsonl" \
  --speech ravdess8="$F/ravdess8-compare2016/dev.jsonl" --speech emodb7="$F/emodb7-compare2016/dev.jsonl" \
  --label-map "$MAP"
