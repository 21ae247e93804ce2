#!/bin/sh
# Entry point of the merc images: fail early, with a reason, when a volume is not usable,
# then hand the process over to the command (PID 1 receives SIGTERM: Celery finishes its job).
set -eu
for dir in "${MERC_DATA_DIR:-/data}" "${XDG_CACHE_HOME:-/cache}"; do
  if [ ! -w "$dir" ]; then
    echo "merc: $dir is not writable by uid $(id -u); chown it to 10001 or mount a named volume" >&2
    exit 1
  fi
done
if [ ! -d "${MERC_WEIGHTS_DIR:-/weights}" ] || [ -z "$(ls -A "${MERC_WEIGHTS_DIR:-/weights}")" ]; then
  echo "merc: no bundles in ${MERC_WEIGHTS_DIR:-/weights}; mount the weights folder there" >&2
else
  # bundle files written with umask 077 on the host cannot be read by uid 10001: their jobs would fail
  unreadable="$(find "${MERC_WEIGHTS_DIR:-/weights}" -type f ! -readable 2>/dev/null | head -3)"
  if [ -n "$unreadable" ]; then
    echo "merc: files under ${MERC_WEIGHTS_DIR:-/weights} unreadable by uid $(id -u) (chmod a+r them):" $unreadable >&2
  fi
fi
# The API image has no torch: it serves only in distributed mode, the jobs running in the worker image.
if [ "${MERC_IMAGE:-}" = api ] && [ -z "${MERC_QUEUE:-}" ] && [ "${1:-}" = merc ] && [ "${2:-}" = serve ]; then
  echo "merc: the API image runs no jobs itself; set MERC_QUEUE=redis://... and run the worker image beside it" >&2
  exit 1
fi
exec "$@"
