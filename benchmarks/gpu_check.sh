#!/usr/bin/env bash
# The GPU path as one prepared check (benchmarks/gpu_check.py): set up, then every CUDA step, figures to one JSON.
#   benchmarks/gpu_check.sh [OUT.json] [--device cuda|cpu] [more gpu_check.py options]
# OUT defaults to $OUT/gpu_check.json where $OUT is set (the device tool), else ./gpu_check.json.
# Python: $MERC_PYTHON, else .venv/bin/python, else scripts/setup.sh makes .venv (PyPI reachable); with
# MERC_GPU_CHECK_NO_SETUP=1 the python3 on PATH is used as it is (its missing packages fail their steps only).
# The whole run stays inside `timeout` 8 minutes (480 s for the steps, each with its own limit).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.json"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out="$1"; shift; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
py="${MERC_PYTHON:-}"
if [ -z "$py" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
if [ -z "$py" ] && [ "${MERC_GPU_CHECK_NO_SETUP:-0}" = "1" ]; then py=python3; fi
if [ -z "$py" ]; then
  MERC_APT=0 timeout 1800 scripts/setup.sh || { echo "gpu_check: scripts/setup.sh failed" >&2; exit 2; }
  py=.venv/bin/python
fi
device=cuda
for a in "$@"; do case "$a" in --device=*) device="${a#--device=}";; esac; done
prev=""; for a in "$@"; do [ "$prev" = "--device" ] && device="$a"; prev="$a"; done
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 480 "$py" benchmarks/gpu_check.py --device "$device" --out "$out" --budget 450 "$@"
rc=$?
[ -f "$out" ] && echo "gpu_check: figures in $out"
exit $rc
