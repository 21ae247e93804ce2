"""Media the tests build themselves with PyAV (and espeak-ng when installed)."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED_MEDIA = ROOT.parent / "shared" / "media"


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, signal: np.ndarray, rate: int = 16000) -> Path:
    """Mono 16-bit PCM WAV."""
    pcm = np.clip(np.round(signal * 32767), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i in range(0, len(pcm), 1024):
            frame = av.AudioFrame.from_ndarray(pcm[None, i : i + 1024], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_video(
    path: Path,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (160, 120),
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_start: float = 0.0,
) -> Path:
    """H.264 (mp4) or MPEG-4 video of moving grey frames, optional AAC audio starting at ``audio_start`` s."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264" if path.suffix == ".mp4" else "mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = None
        if audio is not None:
            sound = out.add_stream("aac", rate=audio_rate, layout="mono")
        for i in range(round(seconds * fps)):
            img = np.full((size[1], size[0], 3), (i * 7) % 255, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        if sound is not None:
            _encode_audio(out, sound, audio, audio_rate, audio_start)
        for packet in video.encode(None):
            out.mux(packet)
    return path


def _encode_audio(out, sound, signal: np.ndarray, rate: int, start: float) -> None:
    offset = round(start * rate)
    for i in range(0, len(signal), 1024):
        frame = av.AudioFrame.from_ndarray(signal[None, i : i + 1024].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, offset + i, Fraction(1, rate)
        for packet in sound.encode(frame):
            out.mux(packet)
    for packet in sound.encode(None):
        out.mux(packet)


def espeak(path: Path, text: str) -> Path | None:
    """A WAV of ``text`` spoken by espeak-ng, or None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def huge_frame_video(path: Path, width: int = 16000, height: int = 16000) -> Path:
    """A few kB of QuickTime (.mov) whose one PNG frame declares ``width`` x ``height`` 16-bit RGB.

    Decoding it allocates width x height x 6 bytes (1.5 GB at 16000x16000) before the data runs out."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    packer = zlib.compressobj(9)
    rows = b"".join(packer.compress(b"\0" * (1 + 6 * width)) for _ in range(min(height, 64))) + packer.flush()
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")
    with av.open(str(path), "w", format="mov") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb48be"
        packet = av.Packet(png)
        packet.stream, packet.pts, packet.dts, packet.time_base = stream, 0, 0, Fraction(1, 1)
        packet.is_keyframe = True
        out.mux(packet)
    return path


def write_m4a(path: Path, signal: np.ndarray, rate: int = 16000) -> Path:
    """Mono AAC in an M4A (``ftyp M4A``) container."""
    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        for i in range(0, len(signal), 16384):
            frame = av.AudioFrame.from_ndarray(signal[None, i : i + 16384], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def understate_duration(path: Path, seconds: float) -> Path:
    """Rewrite the mvhd, mdhd and tkhd durations of an MP4/M4A (version 0 boxes) to say ``seconds``."""
    data = bytearray(path.read_bytes())
    movie = data.index(b"mvhd") + 4  # version, flags, creation, modification, timescale, duration
    movie_scale = int.from_bytes(data[movie + 12 : movie + 16], "big")
    media = data.index(b"mdhd") + 4  # the same layout, in the track's timescale
    media_scale = int.from_bytes(data[media + 12 : media + 16], "big")
    track = data.index(b"tkhd") + 4  # version, flags, creation, modification, track id, reserved, duration
    for at, scale in ((movie + 16, movie_scale), (media + 16, media_scale), (track + 20, movie_scale)):
        data[at : at + 4] = round(seconds * scale).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path
