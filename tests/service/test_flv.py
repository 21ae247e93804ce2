"""Real FLV uploads: the six CREMA-D clips (a data stream first, VP6 video, MP3 audio) are sniffed,
probed, decoded and featurised like any other video."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from models.data import Conversation, Utterance
from service.api.media import inspect_media, sniff
from service.features.registry import make_spec
from service.inference.pipeline import MediaInput, extract_features
from service.media.decode import SAMPLE_RATE, decode_media, open_media
from tests.service.media_helpers import SHARED_MEDIA

CREMAD = SHARED_MEDIA / "cremad"
CLIPS = sorted(CREMAD.glob("*.flv"))
pytestmark = pytest.mark.skipif(len(CLIPS) != 6, reason="../shared/media/cremad (six FLV clips) absent")


def test_the_clips_are_what_the_fixture_claims() -> None:
    for clip in CLIPS:
        with open_media(clip) as container:
            kinds = [(s.type, s.codec_context.name if s.type != "data" else None) for s in container.streams]
            assert container.format.name == "flv"
        assert kinds == [("data", None), ("audio", "mp3float"), ("video", "vp6f")], (clip.name, kinds)
    labels = {row["file"]: row["emotion"] for row in csv.DictReader((CREMAD / "labels.csv").open())}
    assert sorted(labels) == [c.name for c in CLIPS]


def test_sniffed_by_content_and_probed_as_video_or_audio() -> None:
    for clip in CLIPS:
        assert sniff(clip.read_bytes()[:64]) == "flv"
        video = inspect_media(clip, "video", timeout=30, max_seconds=600)
        assert video["format"] == "flv" and video["has_video"] and video["has_audio"]
        assert 1.5 < video["duration"] < 2.5 and video["size"] == clip.stat().st_size
        assert inspect_media(clip, "audio", timeout=30, max_seconds=600)["has_audio"]


def test_decoded_in_one_pass_audio_and_sampled_frames() -> None:
    for clip in CLIPS:
        shapes: list[tuple[int, ...]] = []
        sink = lambda frames, owners, crops, shapes=shapes: shapes.append(frames.shape)  # noqa: E731
        decoded = decode_media(clip, [(0.0, None)], sink=sink)
        duration = inspect_media(clip, "video", timeout=30, max_seconds=600)["duration"]
        assert decoded.has_video and decoded.audio is not None
        assert abs(len(decoded.audio) / SAMPLE_RATE - duration) < 0.15, (clip.name, len(decoded.audio))
        assert np.abs(decoded.audio).max() > 0.05  # speech, not silence
        assert decoded.frames_sampled >= 4 and all(s[1:] == (360, 480, 3) for s in shapes)


@pytest.mark.slow
def test_audio_and_face_features_from_an_flv() -> None:
    clip = CLIPS[0]
    conv = Conversation("cremad", [Utterance("a", "1001", "Don't forget a jacket.", 0.0, 1.0),
                                   Utterance("b", "1001", None, 1.0, 2.2)])  # fmt: skip
    spec = {"audio": make_spec("audio", "egemaps-v02"), "visual": make_spec("visual")}
    features, timings = extract_features(conv, spec, MediaInput(video=clip), "cpu")
    assert all(v is not None and v.shape == (88,) for v in features["audio"])
    assert all(v is not None and np.isfinite(v).all() for v in features["visual"])  # the actor's face is found
    assert timings["decode"] > 0 and timings["face_detection"] > 0
