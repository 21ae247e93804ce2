"""Audio (openSMILE) and visual (MTCNN + PyEmotion) extractors, active-speaker choice, presence rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.features.audio import OpenSmileExtractor, rms_dbfs
from service.features.speaker import choose_faces
from service.features.visual import FaceObs, stats_pool
from service.media.decode import decode_media
from tests.service.media_helpers import SHARED_MEDIA, espeak, tone

needs_shared = pytest.mark.skipif(not SHARED_MEDIA.is_dir(), reason="../shared/media absent")


@pytest.fixture(scope="module")
def egemaps() -> OpenSmileExtractor:
    return OpenSmileExtractor("egemaps-v02", workers=1)


def test_silence_short_and_missing_audio_are_absent(egemaps: OpenSmileExtractor) -> None:
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    out = egemaps.extract([noise, np.zeros(16000, np.float32), tone(0.05), None, tone(1.0)])
    assert out[0] is not None and out[0].shape == (88,) and np.isfinite(out[0]).all()
    assert out[1] is None and out[2] is None and out[3] is None
    assert out[4] is not None and not np.allclose(out[0], out[4])
    assert rms_dbfs(np.zeros(10, np.float32)) == float("-inf")


def test_spoken_sentence_gets_features(tmp_path: Path, egemaps: OpenSmileExtractor) -> None:
    wav = espeak(tmp_path / "speech.wav", "I can't believe you did that to me")
    if wav is None:
        pytest.skip("espeak-ng not installed")
    audio = decode_media(wav, [(0.0, None)]).audio
    assert audio is not None and len(audio) > 16000
    (vec,) = egemaps.extract([audio])
    assert vec is not None and np.isfinite(vec).all()


@needs_shared
@pytest.mark.slow
def test_compare_2016_on_emodb_gives_6373_finite_values() -> None:
    extractor = OpenSmileExtractor("compare2016")
    clips = sorted((SHARED_MEDIA / "emodb").glob("*.wav"))[:4]
    assert clips, "no Emo-DB clips"
    vectors = extractor.extract([decode_media(c, [(0.0, None)]).audio for c in clips])
    for vec in vectors:
        assert vec is not None and vec.shape == (6373,) and np.isfinite(vec).all()
    assert not np.allclose(vectors[0], vectors[1])


def obs(frame: int, x: float, mouth: float, prob: float = 0.99) -> FaceObs:
    crop = np.zeros((48, 48), np.float32)
    crop[24:] = mouth
    return FaceObs(frame, (x, 0.5), 0.2, prob, crop)


def test_active_speaker_is_the_face_whose_mouth_moves() -> None:
    # two faces per frame: the left one is more confident but still, the right one's mouth opens and closes
    frames = [[obs(t, 0.2, 0.5, 0.999), obs(t, 0.7, float(t % 2), 0.95)] for t in range(4)]
    speaker = choose_faces(frames, "speaker")
    assert [o.centre[0] for o in speaker] == [0.7] * 4
    assert [o.centre[0] for o in choose_faces(frames, "confident")] == [0.2] * 4
    assert choose_faces([[], [obs(1, 0.3, 0.1)]], "speaker")[0].frame == 1


def test_stats_pool_shape_and_dynamics() -> None:
    still = stats_pool(np.ones((5, 4), np.float32))
    moving = stats_pool(np.arange(20, dtype=np.float32).reshape(5, 4))
    assert still.shape == (12,) and np.all(still[4:] == 0)
    assert np.all(moving[8:] == 4)  # mean |frame-to-frame change|


@needs_shared
@pytest.mark.slow
def test_faces_found_in_face_videos_and_not_in_no_face() -> None:
    import torch

    from service.features.visual import VisualExtractor, VisualOptions

    extractor = VisualExtractor("mtcnn-pyemotion", VisualOptions(), torch.device("cpu"))
    found = {}
    for name in ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "no_face.mp4"):
        session = extractor.session(1)
        decode_media(SHARED_MEDIA / name, [(0.0, 2.0)], want_audio=False, sink=session, sampling=extractor.sampling())
        found[name] = session.finish()[0]
    assert found["single_face.mp4"] is not None and found["single_face.mp4"].shape == (768,)
    assert found["WolfgangLanger_Pexels.mp4"] is not None and np.isfinite(found["WolfgangLanger_Pexels.mp4"]).all()
    assert found["no_face.mp4"] is None
