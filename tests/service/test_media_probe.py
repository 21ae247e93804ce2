"""The upload probe in killable child processes (service.media.probe): header limits and timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.media.decode import MediaError, MediaLimits, MediaTooLarge
from service.media.probe import ProbePool, ProbeTimeout
from tests.service.media_helpers import huge_frame_video, tone, write_video, write_wav

LIMITS = MediaLimits(max_pixels=7680 * 4320)


@pytest.fixture(scope="module")
def pool() -> ProbePool:
    return ProbePool(size=1)


def test_probe_reports_streams_and_duration(pool: ProbePool, tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=2.0, audio=tone(2.0))
    info = pool.probe(video, True, LIMITS, 3600.0, timeout=60)
    assert info["has_video"] and info["has_audio"] and info["duration"] == pytest.approx(2.0, abs=0.1)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(write_wav(tmp_path / "a.wav", tone(0.5)).read_bytes()[:44] + b"\xff" * 10)
    with pytest.raises(MediaError):
        pool.probe(garbage, False, LIMITS, 3600.0, timeout=60)


def test_huge_frames_are_refused_from_the_header_naming_their_size(pool: ProbePool, tmp_path: Path) -> None:
    """Issue 21 F1: 16000x16000 frames declared by a few kB are refused without decoding them."""
    huge = huge_frame_video(tmp_path / "huge.mov")
    with pytest.raises(MediaTooLarge, match=r"frames of 16000x16000 .*MERC_MAX_VIDEO_PIXELS"):
        pool.probe(huge, True, LIMITS, 3600.0, timeout=60)


def test_a_probe_past_its_timeout_is_killed(pool: ProbePool, tmp_path: Path) -> None:
    """Issue 21 F1: nothing goes on decoding after the answer: the child of a timed-out probe is killed."""
    video = write_video(tmp_path / "v.mp4", seconds=1.0)
    pool.probe(video, True, LIMITS, 3600.0, timeout=60)  # the child is started and warm
    child = pool._free.queue[-1].proc
    assert child is not None and child.is_alive()
    with pytest.raises(ProbeTimeout):
        pool.probe(video, True, LIMITS, 3600.0, timeout=0.0001)
    assert not child.is_alive()
    assert pool.probe(video, True, LIMITS, 3600.0, timeout=60)["has_video"]  # a fresh child serves the next
