"""Structured logs: one JSON object per line, carrying the id of the job being processed.

``setup_logging()`` installs the formatter on the root logger (the API, ``merc worker`` and
Celery's own loggers all go through it). ``job_context(job_id)`` tags every record logged
inside it, in any module, with ``job_id`` (a context variable, so threads and tasks do not
mix their ids up). ``MERC_LOG_FORMAT=text`` switches to plain lines for a terminal.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

_JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("merc_job_id", default=None)
_HOST = socket.gethostname()
# LogRecord attributes that are not user-supplied ``extra=`` fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "job_id"}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every record logged inside the block with ``job_id``."""
    token = _JOB_ID.set(job_id)
    try:
        yield
    finally:
        _JOB_ID.reset(token)


def current_job_id() -> str | None:
    return _JOB_ID.get()


class JobIdFilter(logging.Filter):
    """Adds ``record.job_id`` (from ``extra=`` if given, else from the job context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _JOB_ID.get() or _celery_task_id(record)
        return True


def _celery_task_id(record: logging.LogRecord) -> str | None:
    """Celery's own task records (received, succeeded) carry the task id, which is the job id."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and str(data.get("name", "")).startswith("merc."):
        return data.get("id")
    return None


class JsonFormatter(logging.Formatter):
    """ts, level, logger, msg, job_id, host, pid, plus any ``extra=`` fields and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "job_id": getattr(record, "job_id", None) or _JOB_ID.get(),
            "host": _HOST,
            "pid": record.process,
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str | None = None, fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers by one that writes JSON (or text) lines to ``stream``."""
    level = (level or os.environ.get("MERC_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("MERC_LOG_FORMAT") or "json").lower()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [job=%(job_id)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
