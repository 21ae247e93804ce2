"""PyAV decoding: resampling, exact segments, frame sampling, late streams, bad files."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest

from service.media.decode import FrameSampling, MediaError, MediaLimits, MediaTooLarge, cut, decode_media, set_limits
from tests.service.media_helpers import (
    huge_frame_video,
    tone,
    understate_duration,
    write_m4a,
    write_video,
    write_wav,
)


def ramp_wav(path: Path, n: int = 48000) -> np.ndarray:
    """A 16 kHz WAV whose sample i is (i % 20000 - 10000) / 32767: every sample identifies its index."""
    values = (np.arange(n) % 20000 - 10000).astype(np.float32) / 32767
    write_wav(path, values)
    return values


def test_segments_are_exact_to_the_sample(tmp_path: Path) -> None:
    values = ramp_wav(tmp_path / "ramp.wav")
    audio = decode_media(tmp_path / "ramp.wav", [(0.0, None)]).audio
    assert audio is not None and len(audio) == len(values)
    for start, end in [(0.0, 0.5), (0.123456, 1.987654), (1.00003, 1.00009), (2.5, 9.0)]:
        seg = cut(audio, start, end)
        i0, i1 = round(start * 16000), min(len(values), round(end * 16000))
        assert len(seg) == i1 - i0
        np.testing.assert_array_equal(np.round(seg * 32767), np.round(values[i0:i1] * 32767))
    assert cut(audio, 5.0, 6.0).size == 0


def test_audio_is_resampled_to_16k_mono(tmp_path: Path) -> None:
    signal = tone(1.5, rate=44100, freq=440)
    write_wav(tmp_path / "cd.wav", signal, rate=44100)
    audio = decode_media(tmp_path / "cd.wav", [(0.0, None)]).audio
    assert audio is not None and audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 1.5 * 16000) <= 32
    spectrum = np.abs(np.fft.rfft(audio[1000:17000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2  # 1 Hz bins over 16000 samples


def test_frames_sampled_per_window_and_late_audio_padded(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=2.0, fps=25, audio=tone(1.0), audio_start=1.0)
    batches: list[tuple[np.ndarray, list[list[int]]]] = []
    windows = [(0.0, 1.0), (0.5, 1.5), (1.97, 1.99)]
    sink = lambda f, o, c: batches.append((f, o))  # noqa: E731
    decoded = decode_media(video, windows, sink=sink, sampling=FrameSampling(every=10))
    # 25 frames in [0, 1) -> frames 0, 10, 20; [0.5, 1.5) holds 25 frames -> 3; (1.97, 1.99) holds none
    assert decoded.frames_per_window == [3, 3, 0]
    assert all(f.dtype == np.uint8 and f.shape[1:] == (120, 160, 3) for f, _ in batches)
    assert sum(len(o) for _, o in batches) == decoded.frames_sampled <= 6
    audio = decoded.audio
    assert audio is not None and np.abs(audio[: int(0.8 * 16000)]).max() < 0.01  # silence before the late start
    assert np.abs(cut(audio, 1.3, 1.6)).max() > 0.2


def test_crop_copies_come_at_crop_side_never_upscaled(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=0.5, size=(160, 120))
    got: list[tuple[np.ndarray, np.ndarray]] = []
    for side, fmt, shape in [(60, "gray", (120, 160)), (1000, "rgb24", (120, 160, 3))]:
        got.clear()
        sampling = FrameSampling(every=5, short_side=side, crop_side=side * 2, crop_format=fmt)
        decode_media(video, [(0.0, None)], sink=lambda f, o, c: got.append((f, c)), sampling=sampling)
        frames, crops = got[0]
        assert frames.shape[1:] == ((60, 80, 3) if side == 60 else (120, 160, 3)) and crops.shape[1:] == shape
        assert len(frames) == len(crops) == 3


def test_video_without_audio_and_audio_only(tmp_path: Path) -> None:
    silent = decode_media(write_video(tmp_path / "mute.mp4"), [(0.0, None)], sink=lambda f, o, c: None)
    assert silent.audio is None and silent.has_video and silent.frames_sampled == 5
    wav = decode_media(write_wav(tmp_path / "a.wav", tone(0.5)), [(0.0, None)], sink=lambda f, o, c: None)
    assert not wav.has_video and wav.frames_sampled == 0 and wav.audio is not None


def test_bad_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.mp4", seconds=3.0, audio=tone(3.0))
    data = good.read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    for name, what in [("empty", "zero-byte"), ("garbage", "not a readable media"), ("truncated", "")]:
        with pytest.raises(MediaError, match=f"{name}.mp4.*{what}"):
            decode_media(tmp_path / f"{name}.mp4", [(0.0, None)], sink=lambda f, o, c: None)
    with pytest.raises(MediaError, match=r"missing\.mp4: no such file"):
        decode_media(tmp_path / "missing.mp4", [(0.0, None)])


def test_frames_over_the_pixel_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    """Issue 21 F1: a few kB declaring 16000x16000 frames is refused before any frame is decoded."""
    huge = huge_frame_video(tmp_path / "huge.mov")
    with pytest.raises(MediaTooLarge, match=r"huge\.mov: .*MERC_MAX_VIDEO_PIXELS"):
        decode_media(huge, [(0.0, None)], sink=lambda f, o, c: None, limits=MediaLimits(max_pixels=7680 * 4320))
    small = write_video(tmp_path / "small.mp4", seconds=1.0)  # 160x120
    assert decode_media(small, [(0.0, None)], sink=lambda f, o, c: None).frames_sampled > 0
    set_limits(MediaLimits(max_pixels=100))  # what a worker does with its settings
    try:
        with pytest.raises(MediaTooLarge, match=r"frames of \d+x\d+ \(\d+ pixels\) exceed the limit of 100 pixels"):
            decode_media(small, [(0.0, None)], sink=lambda f, o, c: None)
        assert decode_media(small, [(0.0, None)]).audio is None  # audio only: frames are never decoded
    finally:
        set_limits(MediaLimits())


def test_decoding_stops_at_the_length_limit_whatever_the_header_says(tmp_path: Path) -> None:
    """Issue 21 F2: an m4a whose mvhd/mdhd/tkhd say 1 s while it holds 20 s is stopped past the limit."""
    lying = understate_duration(write_m4a(tmp_path / "lying.m4a", tone(20.0)), 1.0)
    with av.open(str(lying)) as container:
        assert container.duration / 1e6 == pytest.approx(1.0, abs=0.05)  # what the API's probe sees
    with pytest.raises(MediaTooLarge, match=r"lying\.m4a: .*limit of 5 s \(MERC_MAX_MEDIA_SECONDS.*stopped at 6\.\d s"):
        decode_media(lying, [(0.0, None)], limits=MediaLimits(max_seconds=5.0))
    whole = decode_media(lying, [(0.0, None)], limits=MediaLimits(max_seconds=60.0))
    assert len(whole.audio) / 16000 == pytest.approx(20.0, abs=0.1)
    assert decode_media(lying, [(0.0, 2.0)], limits=MediaLimits(max_seconds=5.0)).audio is not None  # stops at 2 s


@pytest.mark.parametrize(("channels", "width"), [(64, 2), (9, 1), (32, 4)])
def test_channels_without_an_order_are_averaged_to_mono(tmp_path: Path, channels: int, width: int) -> None:
    """Issue 21 F7: a valid 64-channel WAV failed as "corrupt or truncated media near 0.00 s"."""
    signal = tone(1.0, rate=8000, level=0.5)
    every = np.zeros((len(signal), channels))
    every[:, ::2] = signal[:, None]  # the tone in even channels, silence in odd ones: the mean is half of it
    scale = 2 ** (8 * width - 1)
    pcm = np.round(every * (scale - 1)) + (scale if width == 1 else 0)  # 8-bit WAV is unsigned
    path = tmp_path / "many.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(width), w.setframerate(8000)
        w.writeframes(pcm.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())
    audio = decode_media(path, [(0.0, None)]).audio
    assert audio.shape == (16000,)
    assert np.abs(audio).max() == pytest.approx(0.5 * ((channels + 1) // 2) / channels, abs=0.02)  # the mean
