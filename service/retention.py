"""Retention: finished jobs (record, media, features, result) are deleted after ``MERC_RETENTION_S``.

Works on either job store: the SQLite one of ``merc serve`` (the API process sweeps) and the
Redis one of distributed mode (every worker's heartbeat thread sweeps too; deleting an
already deleted job is a no-op, so several sweepers agree).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("merc.retention")


def sweep_expired(store: Any, retention_s: float) -> list[str]:
    """Delete every copy of the jobs that finished more than ``retention_s`` seconds ago."""
    expired = store.expired(retention_s)
    for job_id in expired:
        store.delete(job_id)
    if expired:
        log.info("deleted %d jobs past their retention of %g s", len(expired), retention_s)
    return expired


def start_sweeper(store: Any, retention_s: float, interval_s: float) -> threading.Thread:
    """A daemon thread running ``sweep_expired`` every ``interval_s`` seconds."""

    def loop() -> None:
        while True:
            try:
                sweep_expired(store, retention_s)
            except Exception:  # the store away for a moment: try again next round
                log.warning("retention sweep failed", exc_info=True)
            time.sleep(interval_s)

    thread = threading.Thread(target=loop, name="merc-retention", daemon=True)
    thread.start()
    return thread
