"""A killable child process for inference: how MERC_JOB_TIMEOUT_S is enforced while a job runs.

Each job runner (an in-process worker thread of ``merc serve``, or a Celery worker) owns one
``ChildRunner``: a spawned process that imports torch, loads bundles once and runs the
``service.jobs.runner`` function it is sent. The parent waits for the answer at most the job's
time limit; past it, the child is killed (SIGKILL: a model call cannot be interrupted
otherwise), the job fails with a reason naming the limit, and the next job gets a fresh child
(which loads its models again). A child that dies (out of memory, a crash in native code)
fails only the job it was running.

The parent never imports torch: in distributed mode the API process does not map libtorch,
and a worker's supervising process stays small.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from service.settings import Settings

log = logging.getLogger("merc.sandbox")
_CTX = mp.get_context("spawn")  # no fork: safe with threads and CUDA


class JobTimeout(Exception):  # not TimeoutError: that is an OSError, which means a dead pipe here
    """The job ran past its time limit and its process was stopped."""


class ChildDied(RuntimeError):
    """The inference process exited while running a job (killed, out of memory, crashed)."""


class RemoteError(Exception):
    """An exception raised in the child, re-raised here: ``kind`` is its class name."""

    def __init__(self, kind: str, message: str, invalid_input: bool) -> None:
        super().__init__(message)
        self.kind, self.invalid_input = kind, invalid_input


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies (a SIGKILLed worker leaves no
    orphan computing on)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's pipe closing still ends the loop
        pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def _child_main(conn: Connection, settings: Settings, parent_pid: int) -> None:
    """The child's loop: receive (function name, kwargs), answer ("ok", value) or ("error", ...)."""
    _die_with_parent(parent_pid)
    from service.jobs import runner as inference
    from service.logging import setup_logging

    setup_logging(level="WARNING")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    while True:
        try:
            op, kwargs = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            value = getattr(inference, op)(**kwargs)
            conn.send(("ok", value))
        except Exception as e:
            conn.send(("error", (type(e).__name__, str(e), isinstance(e, ValueError))))


class ChildRunner:
    """One inference child process, started on first use and replaced after a kill or a crash."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one call at a time per child
        self.models: list[str] = []  # bundles the current child has loaded (after ``preload``)
        self.last_batch = 1  # jobs in the last micro-batch (service.jobs.worker.process_batch)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _ensure(self) -> Connection:
        if not self.alive() or self._conn is None:
            self._discard()
            parent, child = _CTX.Pipe()
            self._proc = _CTX.Process(
                target=_child_main, args=(child, self.settings, os.getpid()), name="merc-inference", daemon=True
            )
            self._proc.start()
            child.close()
            self._conn = parent
        return self._conn

    def call(self, op: str, timeout_s: float, **kwargs: Any) -> Any:
        """Run ``service.jobs.runner.<op>(**kwargs)`` in the child; JobTimeout past ``timeout_s``."""
        with self._lock:
            conn = self._ensure()
            started = time.monotonic()
            try:
                conn.send((op, kwargs))
                if not conn.poll(timeout_s):
                    self.kill()
                    raise JobTimeout(f"stopped after {time.monotonic() - started:.1f} s")
                status, value = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                code = self._proc.exitcode if self._proc is not None else None
                self.kill()
                raise ChildDied(f"the inference process exited (code {code}) while running the job") from None
        if status == "error":
            raise RemoteError(*value)
        return value

    def preload(self, timeout_s: float = 900.0) -> list[str]:
        """Start the child and load the default bundle and MERC_PRELOAD; the names loaded."""
        self.models = self.call("preload", timeout_s, settings=self.settings)
        return self.models

    def kill(self) -> None:
        """Stop the child now (SIGKILL); the next call starts a fresh one."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._discard()

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self.models = None, None, []
