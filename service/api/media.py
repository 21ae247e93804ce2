"""Uploaded media: content sniffing from the bytes (never the file name or MIME type) and a
bounded probe with PyAV (streams, duration, frame size from the header, one decoded frame) in a
child process that is killed when it runs past MERC_PROBE_TIMEOUT_S (service.media.probe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.api.errors import Problem
from service.media.decode import MediaLimits, MediaTooLarge
from service.media.probe import ProbePool, ProbeTimeout

VIDEO_FORMATS = {"mp4", "mov", "webm", "mkv", "avi", "flv"}
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "m4a"} | VIDEO_FORMATS
_IMAGES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF"}
_PROBES = ProbePool(size=4)


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


def inspect_media(
    path: Path, field: str, timeout: float, max_seconds: float, max_pixels: int = MediaLimits.max_pixels
) -> dict[str, Any]:
    """Sniff and probe an upload for ``field`` (video or audio); a Problem (4xx) if unusable.

    A video whose stream header declares frames over ``max_pixels`` is refused before any decoding."""
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
    try:
        info = _PROBES.probe(path, field == "video", MediaLimits(max_pixels), max_seconds, timeout)
    except ProbeTimeout:
        raise Problem(422, "decode-timeout", f"{field}: decoding took longer than {timeout:g} s", field=field) from None
    except Exception as e:  # any decoder error means an unusable upload
        reason = str(e).replace(f"{path}: ", "").replace(str(path), "the upload").replace(path.name, "the upload")
        if isinstance(e, MediaTooLarge):  # from the stream header, before any decoding
            raise Problem(422, "frame-too-large", f"{field}: {reason}", field=field) from None
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
