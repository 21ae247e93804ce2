"""Waiting for a job inside the event loop (``?wait=``), without holding a thread per request.

In-process workers call ``JobWaiter.finished`` (a ``service.jobs.worker.FINISH_HOOKS`` entry), which
wakes the waiting requests at once; jobs finished by other processes are seen by polling the store.
"""

from __future__ import annotations

import asyncio
import contextlib

from service.jobs.store import QUEUED, RUNNING, JobStore

POLL_S = 0.25


class JobWaiter:
    """asyncio events per job id, set from worker threads through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._events: dict[str, list[asyncio.Event]] = {}

    def finished(self, job_id: str) -> None:
        """Thread-safe: wake whoever waits on ``job_id``."""
        if job_id in self._events:
            self.loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for event in self._events.get(job_id, []):
            event.set()

    async def wait(self, store: JobStore, job_id: str, timeout: float) -> str | None:
        """The job's status once finished, or when ``timeout`` seconds have passed."""
        event = asyncio.Event()
        self._events.setdefault(job_id, []).append(event)
        deadline = self.loop.time() + timeout
        try:
            while True:
                status = await asyncio.to_thread(store.status, job_id)  # no blocking store call in the loop
                remaining = deadline - self.loop.time()
                if status not in (QUEUED, RUNNING) or remaining <= 0:
                    return status
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, POLL_S))
                event.clear()
        finally:
            waiting = self._events.get(job_id, [])
            waiting.remove(event)
            if not waiting:
                self._events.pop(job_id, None)
