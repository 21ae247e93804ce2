"""Retention: finished jobs (record, media, features, result) are deleted after ``MERC_RETENTION_S``.

Works on either job store: the SQLite one of ``merc serve`` and the Redis one of distributed
mode. Every API and worker process runs ``start_sweeper``, but one sweeper acts per interval:
a round starts by taking the store lease ``retention-sweeper`` for the interval (not given
back, it expires), so the other processes skip that round. A round also removes uploads left
in ``tmp/`` by a crashed request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("merc.retention")
LEASE = "retention-sweeper"


def sweep_expired(store: Any, retention_s: float) -> list[str]:
    """Delete every copy of the jobs that finished more than ``retention_s`` seconds ago."""
    expired = store.expired(retention_s)
    for job_id in expired:
        store.delete(job_id)
    if expired:
        log.info("deleted %d jobs past their retention of %g s", len(expired), retention_s)
    return expired


def sweep_round(store: Any, retention_s: float, interval_s: float) -> list[str] | None:
    """One round: None when another process holds this interval's lease, else the deleted ids."""
    if store.acquire(LEASE, ttl_s=interval_s * 0.9) is None:
        return None
    store.sweep_tmp()
    return sweep_expired(store, retention_s)


def start_sweeper(store: Any, retention_s: float, interval_s: float) -> threading.Thread:
    """A daemon thread running ``sweep_round`` every ``interval_s`` seconds."""

    def loop() -> None:
        while True:
            try:
                sweep_round(store, retention_s, interval_s)
            except Exception:  # the store away for a moment: try again next round
                log.warning("retention sweep failed", exc_info=True)
            time.sleep(interval_s)

    thread = threading.Thread(target=loop, name="merc-retention", daemon=True)
    thread.start()
    return thread
