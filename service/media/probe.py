"""Probing an upload in a killable child process: streams, duration, frame size, one decoded frame.

:func:`probe` opens a file under :class:`~service.media.decode.MediaLimits` (frames over
``max_pixels`` are refused from the stream header, never decoded) and decodes one frame of the
stream that matters. :class:`ProbePool` runs it in a few spawned child processes that import only
PyAV and NumPy: the caller waits at most its timeout, and a child still busy then is killed
(SIGKILL), so nothing goes on decoding after the answer and a stuck decode holds no memory of the
API process. A child dies with its parent (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.media.decode import MediaError, MediaLimits, MediaTooLarge, open_media

_CTX = mp.get_context("spawn")  # no fork of a threaded server process


class ProbeTimeout(Exception):
    """The probe ran past its time limit; its child process was killed."""


def probe(path: Path, want_video: bool, limits: MediaLimits, max_seconds: float = float("inf")) -> dict[str, Any]:
    """Streams, duration and one decoded frame of the stream that matters (video when ``want_video``).

    A container that declares no duration (a matroska written to a pipe) is measured from its
    packets' timestamps, up to just past ``max_seconds``. MediaTooLarge for frames over the limit."""
    with open_media(path, limits, video=want_video) as container:
        has_video = bool(container.streams.video)
        has_audio = bool(container.streams.audio)
        duration = container.duration / 1_000_000 if container.duration else None
        if duration is None:
            spans = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
            duration = max(spans, default=None)
    if duration is None:
        duration = packet_duration(path, limits, max_seconds)
    with open_media(path, limits) as container:
        stream = (container.streams.video or container.streams.audio)[0]
        if want_video and has_video:
            stream = container.streams.video[0]
        elif not want_video and has_audio:
            stream = container.streams.audio[0]
        stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
        if next(iter(container.decode(stream)), None) is None:
            raise MediaError("no frame could be decoded")
    return {"duration": duration, "has_video": has_video, "has_audio": has_audio}


def packet_duration(path: Path, limits: MediaLimits, max_seconds: float) -> float | None:
    """Seconds covered by the packets of every stream (demuxed, not decoded); stops past ``max_seconds``."""
    end = None
    with open_media(path, limits) as container:
        for packet in container.demux():
            if packet.pts is None or packet.time_base is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
            if end > max_seconds:
                break
    return end


def _child_main(conn: Connection) -> None:
    """A probe child's loop: receive probe() arguments, answer ("ok", info) or ("error", kind, message)."""
    import ctypes

    import av.logging

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the closed pipe still ends the loop
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the API process
    av.logging.set_level(av.logging.ERROR)  # open_media reads the declared size of a refused frame from the log
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", probe(*args)))
        except Exception as e:  # any decoder error means an unusable upload
            conn.send(("too-large" if isinstance(e, MediaTooLarge) else "error", str(e)))


class _Child:
    """One probe process, started on first use, killed when a probe runs past its time."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.conn: Connection | None = None

    def call(self, args: tuple, timeout: float) -> tuple[str, Any]:
        if self.proc is None or not self.proc.is_alive() or self.conn is None:
            self.kill()
            self.conn, child = _CTX.Pipe()
            self.proc = _CTX.Process(target=_child_main, args=(child,), name="merc-probe", daemon=True)
            self.proc.start()
            child.close()
        try:
            self.conn.send(args)
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):  # the child died (a crash in native code)
            code = self.proc.exitcode
            self.kill()
            return "error", f"the decoder process exited (code {code})"
        self.kill()
        raise ProbeTimeout(f"stopped after {timeout:g} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        if self.conn is not None:
            self.conn.close()
        self.proc, self.conn = None, None


class ProbePool:
    """Up to ``size`` probes at once, each in its own child; more callers wait for a free one."""

    def __init__(self, size: int = 4) -> None:
        self._free: queue.LifoQueue[_Child] = queue.LifoQueue()  # the warm child first
        for _ in range(size):
            self._free.put(_Child())

    def probe(self, path: Path, want_video: bool, limits: MediaLimits, max_seconds: float, timeout: float) -> dict:
        """:func:`probe` in a child: ProbeTimeout past ``timeout`` seconds (the child is killed),
        MediaTooLarge or MediaError (message without the child's traceback) for unusable media."""
        child = self._free.get()
        try:
            kind, value = child.call((path, want_video, limits, max_seconds), timeout)
        finally:
            self._free.put(child)
        if kind == "ok":
            return value
        raise (MediaTooLarge if kind == "too-large" else MediaError)(value)
