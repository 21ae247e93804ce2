#!/usr/bin/env bash
# Set up a fresh machine (.venv, Python 3.11) and start the REST service with its in-process
# worker and SQLite job store. Arguments go to `merc serve` (--host, --port); settings are
# MERC_* variables (MERC_DATA_DIR, MERC_DEFAULT_MODEL, MERC_API_KEYS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/merc serve "$@"
