"""Uploaded media: content sniffing from the bytes (never the file name or MIME type) and a
bounded probe with PyAV (streams, duration, one decoded frame)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

from service.api.errors import Problem

VIDEO_FORMATS = {"mp4", "mov", "webm", "mkv", "avi", "flv"}
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "m4a"} | VIDEO_FORMATS
_IMAGES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF"}
_PROBES = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="merc-probe")


def sniff(head: bytes) -> str | None:
    """The container format from the first bytes of a file, or None if unrecognised."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        return "m4a" if brand in (b"M4A ", b"M4B ") else "mov" if brand == b"qt  " else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm" if b"webm" in head[:64] else "mkv"
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return "wav" if head[8:12] == b"WAVE" else "avi"
    for magic, fmt in ((b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3", "mp3"), (b"FLV\x01", "flv")):
        if head.startswith(magic):
            return fmt
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "mp3"
    return None


def _describe_unknown(head: bytes) -> str:
    for magic, what in _IMAGES.items():
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def _probe(path: Path, want_video: bool, max_seconds: float = float("inf")) -> dict[str, Any]:
    """Open with PyAV, list streams, and decode one frame of the stream that matters.

    A container that declares no duration (a matroska written to a pipe) is measured from its
    packets' timestamps, up to just past ``max_seconds``."""
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        has_video = bool(container.streams.video)
        has_audio = bool(container.streams.audio)
        duration = container.duration / 1_000_000 if container.duration else None
        if duration is None:
            spans = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
            duration = max(spans, default=None)
    if duration is None:
        duration = packet_duration(path, max_seconds)
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = (container.streams.video or container.streams.audio or [None])[0]
        if want_video and has_video:
            stream = container.streams.video[0]
        elif not want_video and has_audio:
            stream = container.streams.audio[0]
        if stream is not None and next(iter(container.decode(stream)), None) is None:
            raise ValueError("no frame could be decoded")
    return {"duration": duration, "has_video": has_video, "has_audio": has_audio}


def packet_duration(path: Path, max_seconds: float) -> float | None:
    """Seconds covered by the packets of every stream (demuxed, not decoded); stops past ``max_seconds``."""
    import av

    end = None
    with av.open(str(path), metadata_errors="ignore") as container:
        for packet in container.demux():
            if packet.pts is None or packet.time_base is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
            if end > max_seconds:
                break
    return end


def inspect_media(path: Path, field: str, timeout: float, max_seconds: float) -> dict[str, Any]:
    """Sniff and probe an upload for ``field`` (video or audio); a Problem (4xx) if unusable."""
    size = path.stat().st_size
    if size == 0:
        raise Problem(422, "empty-media", f"{field}: the uploaded file is empty (0 bytes)", field=field)
    with path.open("rb") as f:
        head = f.read(64)
    fmt = sniff(head)
    allowed = VIDEO_FORMATS if field == "video" else AUDIO_FORMATS
    if fmt is None or fmt not in allowed:
        what = fmt or _describe_unknown(head)
        raise Problem(
            415,
            "unsupported-media",
            f"{field}: the content is {what}, not a supported {field} container ({', '.join(sorted(allowed))})",
            field=field,
        )
    future = _PROBES.submit(_probe, path, field == "video", max_seconds)
    try:
        info = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise Problem(422, "decode-timeout", f"{field}: decoding took longer than {timeout:g} s", field=field) from None
    except Exception as e:  # any decoder error means a corrupt upload
        reason = str(e).replace(str(path), "the upload").replace(path.name, "the upload")  # no server paths
        raise Problem(
            422, "corrupt-media", f"{field}: looks like {fmt} but cannot be decoded ({reason})", field=field
        ) from e
    _check_streams(info, field, fmt, max_seconds)
    return {"format": fmt, "size": size, **info}


def _check_streams(info: dict[str, Any], field: str, fmt: str, max_seconds: float) -> None:
    if field == "video" and not info["has_video"]:
        raise Problem(422, "no-video-stream", f"video: the {fmt} file has no video stream", field=field)
    if field == "audio" and not info["has_audio"]:
        raise Problem(422, "no-audio-stream", f"audio: the {fmt} file has no audio stream", field=field)
    if info["duration"] is not None and info["duration"] > max_seconds:
        raise Problem(
            413,
            "media-too-long",
            f"{field}: {info['duration']:.1f} s of media exceeds the {max_seconds:g} s limit",
            field=field,
        )
