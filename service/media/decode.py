"""Media decoding with PyAV: one pass over a file, audio to 16 kHz mono, frames sampled per utterance.

:func:`decode_media` demuxes the audio and video streams of one file together, once, front to
back. Audio is resampled to :data:`SAMPLE_RATE` mono float32 and kept (10 minutes = 38 MB); video
frames are never all kept: inside each utterance window one frame per ``frame_every`` frame
intervals (``frame_every / fps`` seconds) is scaled down and converted to RGB by one swscale call
(optionally also to a larger grayscale or RGB copy for cropping faces), handed to a callback in
batches, then dropped. When ``frame_every > 1`` the decoder skips the frames no other frame refers to
(``skip_frame="NONREF"``: B-frames; half the decode time on a typical H.264 file), and a sample is
the first decoded frame at or after its time; frames decoded but not sampled are never converted.

Media time is the player's clock: seconds from the container's start. A stream that starts late is
padded with silence (audio) or simply has no frames there (video); timestamps, not frame counts,
place frames, so variable frame rates are fine. Audio-only and video-only files work.

Anything wrong with a file raises :class:`MediaError` naming the file and the problem. Files are
opened under :class:`MediaLimits` (the process default, set by :func:`set_limits`, or one passed in):
a video whose stream header declares frames over ``max_pixels`` is refused (:class:`MediaTooLarge`)
before a frame is decoded; FFmpeg's own probe of the streams never decodes frames past it either.
Decoding stops with MediaTooLarge once decoded timestamps pass ``max_seconds``, whatever length the
header declares.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import av.logging
import numpy as np
from av.video.reformatter import VideoReformatter

SAMPLE_RATE = 16000
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".flv")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".ogg")
TRUNCATION_TOLERANCE_S = 1.0
LENGTH_TOLERANCE_S = 1.0  # decoded media may run this far past MediaLimits.max_seconds (container rounding)

Window = tuple[float, float | None]
"""An utterance's ``(start, end)`` in seconds; ``end=None`` runs to the end of the media."""

FrameSink = Callable[[np.ndarray, list[list[int]], "np.ndarray | None"], None]
"""Receives ``frames`` (B, H, W, 3) uint8 RGB at ``short_side``; per frame, the indices of the windows it
belongs to; and ``crops``: the same frames at ``crop_side``, (B, H2, W2) uint8 gray or (B, H2, W2, 3) RGB
(None without ``crop_side``)."""


class MediaError(ValueError):
    """A media file that cannot be used; the message names the file and what is wrong."""


class MediaTooLarge(MediaError):
    """A media file over a :class:`MediaLimits` bound; the message names the setting."""


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on what a file may cost to decode.

    Attributes:
        max_pixels: largest video frame (width x height) decoded; larger ones are refused from the
            stream header (the service's ``MERC_MAX_VIDEO_PIXELS``).
        max_seconds: decoding stops, refusing the file, once decoded timestamps pass this (with
            :data:`LENGTH_TOLERANCE_S`), whatever the header declares (``MERC_MAX_MEDIA_SECONDS``).
    """

    max_pixels: int = 2**31 - 1  # FFmpeg's own default (INT_MAX)
    max_seconds: float = float("inf")


_limits = MediaLimits()
_PICTURE_SIZE = re.compile(r"Picture size (\d+)x(\d+)")


def set_limits(limits: MediaLimits) -> None:
    """The limits every later decode of this process uses when it is given none (a worker's settings)."""
    global _limits
    _limits = limits


def frame_size_problem(stream: av.video.stream.VideoStream, limits: MediaLimits, logged: str = "") -> str | None:
    """Why frames of ``stream`` are too large to decode, from its header; None when they are not.

    A stream that FFmpeg could not size (its probe refused the first frame over ``max_pixels``,
    logging ``Picture size WxH``; ``logged`` holds that log) is refused too."""
    width, height = stream.codec_context.width, stream.codec_context.height
    cap = f"the limit of {limits.max_pixels} pixels (MERC_MAX_VIDEO_PIXELS)"
    if not (width and height) and (found := _PICTURE_SIZE.search(logged)):
        width, height = int(found[1]), int(found[2])
    if not (width and height):
        return f"the frame size cannot be read from the video stream header, or exceeds {cap}"
    if width * height > limits.max_pixels:
        return f"frames of {width}x{height} ({width * height} pixels) exceed {cap}"
    return None


@dataclass(frozen=True)
class FrameSampling:
    """Which frames reach the visual extractor.

    Attributes:
        every: keep one decoded frame in ``every`` inside each window (the first one included).
        short_side: sampled frames are scaled down (never up) to this shorter side, in pixels.
        batch: frames per callback.
        crop_side: when set, each sampled frame also comes at this shorter side (never upscaled) ...
        crop_format: ... as ``"gray"`` or ``"rgb24"``.
    """

    every: int = 10
    short_side: int = 360
    batch: int = 32
    crop_side: int | None = None
    crop_format: str = "gray"


@dataclass
class DecodedMedia:
    """What one pass over a file produced.

    Attributes:
        path: the file.
        audio: (n,) float32 mono at :data:`SAMPLE_RATE`, sample 0 = media time 0; None without an audio stream.
        has_video: the file has a video stream.
        frames_sampled: frames handed to the sink.
        frames_per_window: per window, how many frames were sampled inside it.
        decode_seconds: wall time of demuxing, decoding, resampling and scaling (sink time excluded).
    """

    path: Path
    audio: np.ndarray | None
    has_video: bool
    frames_sampled: int = 0
    frames_per_window: list[int] = field(default_factory=list)
    decode_seconds: float = 0.0


def open_media(path: str | Path, limits: MediaLimits | None = None, video: bool = False) -> av.container.InputContainer:
    """Open ``path`` with PyAV; MediaError for a missing, zero-byte, unreadable or stream-less file.

    FFmpeg's stream probe decodes no frame over ``limits.max_pixels``; with ``video``, a first
    video stream whose frames exceed it is refused (MediaTooLarge) before anything is decoded."""
    path, limits = Path(path), limits or _limits
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: zero-byte file")
    try:
        with av.logging.Capture() as logs:  # filled only where av.logging has a level (the API's probe)
            container = av.open(str(path), metadata_errors="ignore", options={"max_pixels": str(limits.max_pixels)})
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: not a readable media file (corrupt, truncated or unsupported format: {e})") from None
    problem = None
    if not container.streams.audio and not container.streams.video:
        problem = MediaError(f"{path}: no audio or video stream")
    elif video and container.streams.video:
        reason = frame_size_problem(container.streams.video[0], limits, " ".join(m for _, _, m in logs))
        problem = MediaTooLarge(f"{path}: {reason}") if reason else None
    if problem is not None:
        container.close()
        raise problem
    return container


def cut(audio: np.ndarray, start: float | None, end: float | None, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples ``round(start * rate)`` (inclusive) to ``round(end * rate)`` (exclusive) of ``audio`` (a view).

    ``start=None`` means 0, ``end=None`` the end; the result is empty when the window lies outside.
    """
    i0 = 0 if start is None else max(0, round(start * rate))
    i1 = len(audio) if end is None else min(len(audio), max(0, round(end * rate)))
    return audio[i0 : max(i0, i1)]


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = min(1.0, short_side / max(1, min(width, height)))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


class _FrameSampler:
    """Picks frames per window (one in ``every``), converts them, batches them into the sink."""

    def __init__(
        self, windows: Sequence[Window], sampling: FrameSampling, sink: FrameSink | None, interval: float | None = None
    ) -> None:
        self.windows = [(s, float("inf") if e is None else e) for s, e in windows]
        self.sampling, self.sink, self.interval = sampling, sink, interval
        self.seen = [0] * len(windows)
        self.next_t = [s for s, _ in self.windows]  # time-based sampling: the next sample's time per window
        self.taken = [0] * len(windows)
        self.batch: list[np.ndarray] = []
        self.crops: list[np.ndarray] = []
        self.owners: list[list[int]] = []
        self.size: tuple[int, int] | None = None
        self.crop_size: tuple[int, int] | None = None
        self.sink_seconds = 0.0
        # one swscale context each, reused for every frame (frame.reformat builds a new one per call:
        # ~40 % of the conversion time at 48 sampled frames)
        self._scaler, self._crop_scaler = VideoReformatter(), VideoReformatter()

    def add(self, frame: av.VideoFrame, t: float) -> None:
        chosen = []
        for w, (start, end) in enumerate(self.windows):
            if start <= t < end:
                if self._due(w, t):
                    chosen.append(w)
                    self.taken[w] += 1
                self.seen[w] += 1
        if not chosen or self.sink is None:
            return
        if self.size is None:
            self.size = _scaled_size(frame.width, frame.height, self.sampling.short_side)
            if self.sampling.crop_side is not None:
                self.crop_size = _scaled_size(frame.width, frame.height, self.sampling.crop_side)
        w, h = self.size
        self.batch.append(self._scaler.reformat(frame, width=w, height=h, format="rgb24").to_ndarray())
        if self.crop_size is not None:
            w, h = self.crop_size
            crop = self._crop_scaler.reformat(frame, width=w, height=h, format=self.sampling.crop_format)
            self.crops.append(crop.to_ndarray())
        self.owners.append(chosen)
        if len(self.batch) >= self.sampling.batch:
            self.flush()

    def _due(self, w: int, t: float) -> bool:
        """Whether the frame at ``t`` is window ``w``'s next sample (by count, or by time with ``interval``)."""
        if self.interval is None:
            return self.seen[w] % self.sampling.every == 0
        if t + 1e-6 < self.next_t[w]:
            return False
        self.next_t[w] += self.interval * (int((t + 1e-6 - self.next_t[w]) / self.interval) + 1)
        return True

    def flush(self) -> None:
        if self.batch and self.sink is not None:
            started = time.perf_counter()
            self.sink(np.stack(self.batch), self.owners, np.stack(self.crops) if self.crops else None)
            self.sink_seconds += time.perf_counter() - started
        self.batch, self.crops, self.owners = [], [], []


class _AudioCollector:
    """Resamples decoded audio frames to 16 kHz mono float32, padding a late stream start with zeros.

    Channels without a known order (a 64-channel WAV: swresample refuses to mix it, or guesses a
    layout and overshoots) are averaged to mono first (:func:`_mean_channels`)."""

    def __init__(self) -> None:
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.chunks: list[np.ndarray] = []
        self.first_t: float | None = None
        self.average = False

    def add(self, frame: av.AudioFrame, t: float) -> None:
        if self.first_t is None:
            self.first_t = t
            channels = frame.layout.channels
            self.average = len(channels) > 2 and any(c.name == "NONE" for c in channels)
        if not self.average:
            try:
                self.chunks += [out.to_ndarray().reshape(-1) for out in self.resampler.resample(frame)]
                return
            except (av.FFmpegError, ValueError):  # a layout swresample cannot mix down: average it
                if self.chunks:
                    raise
                self.average = True
                self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.chunks += [out.to_ndarray().reshape(-1) for out in self.resampler.resample(_mean_channels(frame))]

    def finish(self) -> np.ndarray:
        """(n,) float32; a stream starting at t > 0 gets t seconds of leading zeros, t < 0 (priming) is cut."""
        for out in self.resampler.resample(None):
            self.chunks.append(out.to_ndarray().reshape(-1))
        signal = np.concatenate(self.chunks).astype(np.float32, copy=False) if self.chunks else np.zeros(0, np.float32)
        offset = round((self.first_t or 0.0) * SAMPLE_RATE)
        if offset > 0:
            return np.concatenate([np.zeros(offset, dtype=np.float32), signal])
        return signal[-offset:]


def _mean_channels(frame: av.AudioFrame) -> av.AudioFrame:
    """The mean of ``frame``'s channels, as one float channel at its rate and time."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # interleaved: (1, samples * channels)
        data = data.reshape(-1, len(frame.layout.channels)).T
    if data.dtype.kind in "iu":  # PCM integers to [-1, 1); unsigned ones are centred on half their range
        unsigned = data.dtype.kind == "u"
        half = np.iinfo(data.dtype).max // 2 + 1 if unsigned else -np.iinfo(data.dtype).min
        data = (data.astype(np.float64) - (half if unsigned else 0)) / half
    mean = data.mean(axis=0, dtype=np.float64).astype(np.float32)
    mono = av.AudioFrame.from_ndarray(mean[None], format="flt", layout="mono")
    mono.sample_rate, mono.pts, mono.time_base = frame.sample_rate, frame.pts, frame.time_base
    return mono


def _frame_time(frame: av.AudioFrame | av.VideoFrame, origin: float, last: float) -> float:
    return last if frame.time is None else float(frame.time) - origin


def decode_media(
    path: str | Path,
    windows: Sequence[Window],
    want_audio: bool = True,
    sink: FrameSink | None = None,
    sampling: FrameSampling = FrameSampling(),
    limits: MediaLimits | None = None,
) -> DecodedMedia:
    """Decode ``path`` once: keep its audio (when ``want_audio``), send sampled frames to ``sink``.

    Frames are only decoded when a sink is given. Decoding stops once every wanted stream has
    passed the last window's end. Raises MediaError for unreadable, corrupt or truncated files,
    MediaTooLarge past ``limits`` (default: the process's, :func:`set_limits`).
    """
    path, limits = Path(path), limits or _limits
    container = open_media(path, limits, video=sink is not None)
    started = time.perf_counter()
    with container:
        audio_stream = container.streams.audio[0] if want_audio and container.streams.audio else None
        video_stream = container.streams.video[0] if sink is not None and container.streams.video else None
        interval = None
        if video_stream is not None:
            video_stream.thread_type = "SLICE"  # frame threads would fight face detection for the cores
            video_stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}  # a later, larger frame
            rate = video_stream.average_rate or video_stream.guessed_rate
            if sampling.every > 1 and rate:
                video_stream.codec_context.skip_frame = "NONREF"  # B-frames are never needed: skip them
                interval = sampling.every / float(rate)
        streams = [s for s in (audio_stream, video_stream) if s is not None]
        sampler = _FrameSampler(windows, sampling, sink, interval)
        collector = _AudioCollector() if audio_stream is not None else None
        _demux(container, streams, collector, sampler, windows, path, limits.max_seconds)
        sampler.flush()
        audio = collector.finish() if collector is not None else None
        has_video = bool(container.streams.video)
    return DecodedMedia(
        path=path,
        audio=audio,
        has_video=has_video,
        frames_sampled=sum(sampler.taken),
        frames_per_window=list(sampler.taken),
        decode_seconds=time.perf_counter() - started - sampler.sink_seconds,
    )


def _demux(container, streams, collector, sampler, windows, path: Path, max_seconds: float) -> None:
    """The decode loop: each packet of ``streams`` decoded once, frames routed by stream type.

    MediaTooLarge as soon as a decoded frame lies past ``max_seconds`` (a header may understate the length)."""
    if not streams:
        return
    origin = container.start_time / 1e6 if container.start_time is not None else 0.0
    horizon = max((float("inf") if e is None else e) for _, e in windows) if windows else float("inf")
    last = {s.index: 0.0 for s in streams}
    done: set[int] = set()
    try:
        for packet in container.demux(streams):
            index = packet.stream.index
            for frame in packet.decode():
                t = _frame_time(frame, origin, last[index])
                last[index] = t
                if t > max_seconds + LENGTH_TOLERANCE_S:
                    raise _too_long(container, path, t, max_seconds)
                if packet.stream.type == "video":
                    sampler.add(frame, t)
                else:
                    collector.add(frame, t)
                if t > horizon:
                    done.add(index)
            if len(done) == len(streams):
                return
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: corrupt or truncated media near {max(last.values()):.2f} s ({e})") from None
    _check_complete(container, last, path)


def _too_long(container, path: Path, t: float, max_seconds: float) -> MediaTooLarge:
    declared = f"its header declares {container.duration / 1e6:.1f} s" if container.duration else "no length declared"
    return MediaTooLarge(
        f"{path}: the media runs past the limit of {max_seconds:g} s (MERC_MAX_MEDIA_SECONDS; {declared}); "
        f"decoding stopped at {t:.1f} s"
    )


def _check_complete(container, last: dict[int, float], path: Path) -> None:
    """MediaError when a stream stops well before the duration the file's header declares."""
    if container.duration is None:
        return
    declared = container.duration / 1e6
    reached = max(last.values())
    if reached + TRUNCATION_TOLERANCE_S < declared * 0.95:
        raise MediaError(f"{path}: truncated: media ends at {reached:.2f} s but the header declares {declared:.2f} s")
