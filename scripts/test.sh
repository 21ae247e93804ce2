#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (lint, then pytest). CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
