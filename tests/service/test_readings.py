"""Face and voice readings beside the fused distribution (service.inference.readings and .pipeline), on real media.

Media: the CREMA-D clips (a face speaking), the Emo-DB wavs (speech, no video), the face videos of
../shared/media (one with a silent sound track), no_face.mp4 (sound, no face) and generated silence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.data import Conversation, Utterance, parse_conversation, read_jsonl
from service.features.speaker_norm import SpeakerNormaliser
from service.inference.pipeline import MediaInput, extract_features, run_conversation
from tests.service.media_helpers import ROOT, SHARED_MEDIA, write_wav

SHARED_DATA = ROOT.parent / "shared" / "data"
CREMAD = SHARED_MEDIA / "cremad" / "1001_DFA_ANG_XX.flv"
needs_shared = pytest.mark.skipif(not CREMAD.is_file(), reason="../shared/media absent")
EMODB_LABELS = ["neutral", "anger", "boredom", "disgust", "fear", "happiness", "sadness"]
VOICE_LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]  # the default, voice-en7: MELD's
VOICE_EMODB7 = ROOT / "weights" / "readings" / "voice-emodb7"


@pytest.fixture(scope="module")
def predictor():
    from service.inference.predictor import Predictor

    return Predictor("dmd-meld7", "cpu", weights_dir=ROOT / "weights")


def one(cid: str, *spans: tuple[float, float], text: str = "Don't forget a jacket.") -> Conversation:
    return Conversation(cid, [Utterance(f"u{i}", "actor", text, s, e) for i, (s, e) in enumerate(spans)])


def assert_distribution(reading: dict, labels: list[str]) -> None:
    dist = reading["distribution"]
    assert list(dist) == labels and abs(sum(dist.values()) - 1) < 1e-3
    assert reading["emotion"] == max(dist, key=dist.get)


# ---------------------------------------------------------------- speaker normalisation


def test_speaker_norm_shrinks_few_utterances_towards_training_statistics() -> None:
    rng = np.random.default_rng(0)
    norm = SpeakerNormaliser(np.zeros(3), np.ones(3), shrink=4.0)
    x = np.array([2.0, 0.5, -2.0])
    lone = norm.apply([x], ["a"])[0]  # mu = (x + 4 * 0) / 5, var = (0 + 4 * 1) / 5
    assert lone is not None and np.allclose(lone, (x - x / 5) / np.sqrt(0.8))  # not plain z-scores' zeros
    many = [rng.normal(10, 3, 3) for _ in range(400)]
    z = np.stack(norm.apply(many, ["b"] * 400))
    assert np.allclose(z.mean(axis=0), 0, atol=0.05) and np.allclose(z.std(axis=0), 1, atol=0.05)
    mixed = norm.apply([np.ones(3), None, np.ones(3) * 3], ["a", "a", "b"])
    assert mixed[1] is None and not np.allclose(mixed[0], mixed[2])


def test_speaker_norm_round_trip(tmp_path: Path) -> None:
    norm = SpeakerNormaliser(np.array([1e4 + 1e-3, 2.0]), np.array([1e-3, 0.0]), shrink=2.5)
    norm.save(tmp_path / "n.safetensors")
    back = SpeakerNormaliser.load(tmp_path / "n.safetensors")
    assert back.shrink == 2.5 and np.array_equal(back.mean, norm.mean) and np.array_equal(back.std, norm.std)
    assert back.apply([np.array([1e4, 5.0])], ["s"])[0][1] == 0.0  # zero-variance feature -> 0


# ---------------------------------------------------------------- the voice reading model


def test_voice_artefact_describes_itself() -> None:
    from service.features.voice_reading import load_voice_model

    model = load_voice_model(VOICE_EMODB7)
    m = model.manifest
    assert model.labels == EMODB_LABELS and m["feature_spec"]["audio"]["dim"] == 6373
    assert m["accuracy"]["dev_uar"] > 82.5  # the session-normalised logistic-regression baseline
    assert "Emo-DB" in m["licence"] and m["selection"]["criterion"] == "dev UAR"
    assert (ROOT / "weights" / "readings" / "voice-emodb7" / "model.safetensors").stat().st_size < 1_000_000


@needs_shared
@pytest.mark.slow
def test_voice_reading_on_an_unseen_speakers_session() -> None:
    """Dev speaker 10's first session (real Emo-DB wavs, one file per utterance): most are read right."""
    dev = SHARED_DATA / "emodb7" / "dev.jsonl"
    if not dev.is_file():
        pytest.skip("../shared/data/emodb7 absent")
    from service.features.registry import extractor_for
    from service.features.voice_reading import load_voice_model
    from service.media.decode import decode_media

    model = load_voice_model(VOICE_EMODB7)
    conv = next(c for c in read_jsonl(dev) if c.utterances[0].speaker == "speaker10")
    audio = extractor_for("audio", model.feature_entry, "cpu")
    signals = [decode_media(SHARED_MEDIA / "emodb7" / f"{u.id}.wav", [(0.0, None)]).audio for u in conv.utterances]
    probs = model.predict(audio.extract(signals), [u.speaker for u in conv.utterances])
    hits = sum(EMODB_LABELS[int(np.argmax(p))] == u.label for p, u in zip(probs, conv.utterances, strict=True))
    assert hits >= len(conv.utterances) // 2 + 1, f"{hits}/{len(conv.utterances)}"


# ---------------------------------------------------------------- readings in the pipeline, real media


@needs_shared
@pytest.mark.slow
def test_face_video_with_speech_gets_face_and_voice_readings(predictor) -> None:
    conv = one("cremad", (0.0, 1.1), (1.1, 2.2))
    result = run_conversation(predictor, conv, MediaInput(video=CREMAD), "cpu")
    for utt in result["utterances"]:
        face, voice = utt["readings"]["face"], utt["readings"]["voice"]
        assert_distribution(face, result["readings"]["face"]["labels"])
        assert_distribution(voice, VOICE_LABELS)
        assert 1 <= face["frames"] <= face["frames_sampled"] and 0 < voice["speech_seconds"] <= 1.11
        assert utt["modalities"] == ["text"] and list(utt["distribution"]) == result["labels"]  # fused: the bundle's
    top = result["readings"]
    assert top["face"]["model"] == "minixception-fer2013" and top["voice"]["accuracy"]["dev_uar"] > 60
    assert "CC BY-NC-SA 4.0" in top["voice"]["licence"]  # RAVDESS: non-commercial, said where it is served
    assert {"training_data", "licence", "accuracy", "pooling"} <= set(top["face"]) & set(top["voice"])
    plain, _ = extract_features(conv, predictor.feature_spec, MediaInput(video=CREMAD), "cpu", readings=False)
    assert plain.readings is None  # readings stand beside the fused distribution and never change it
    from service.inference.pipeline import score

    again = score(predictor, conv, plain, ["text", "audio", "visual"], {})
    assert [u["distribution"] for u in again["utterances"]] == [u["distribution"] for u in result["utterances"]]


@needs_shared
def test_emodb_wav_gets_a_voice_reading_only(predictor) -> None:
    wav = SHARED_MEDIA / "emodb" / "03a01Wa.wav"
    conv = Conversation("emodb", [Utterance("u0", "speaker03", "Der Lappen liegt auf dem Eisschrank.")])
    result = run_conversation(predictor, conv, MediaInput(audio=wav), "cpu")
    (utt,) = result["utterances"]
    assert set(utt["readings"]) == {"voice"} and set(result["readings"]) == {"voice"}
    assert_distribution(utt["readings"]["voice"], VOICE_LABELS)
    assert 1.0 < utt["readings"]["voice"]["speech_seconds"] <= 2.0


def test_silence_only_gets_no_voice_reading(tmp_path: Path, predictor) -> None:
    wav = write_wav(tmp_path / "silence.wav", np.zeros(32000, np.float32))
    conv = Conversation("quiet", [Utterance("u0", "a", "hello", 0.0, 1.0), Utterance("u1", "a", "there", 1.0, 2.0)])
    result = run_conversation(predictor, conv, MediaInput(audio=wav), "cpu")
    assert all("readings" not in u for u in result["utterances"])
    assert set(result["readings"]) == {"voice"}  # media came: the model is described, nothing was read


@needs_shared
@pytest.mark.slow
def test_speech_with_no_face_and_face_with_no_speech(predictor) -> None:
    sound = run_conversation(predictor, one("nf", (0.0, 2.0)), MediaInput(video=SHARED_MEDIA / "no_face.mp4"), "cpu")
    assert set(sound["utterances"][0]["readings"]) == {"voice"} and set(sound["readings"]) == {"face", "voice"}
    silent = SHARED_MEDIA / "WolfgangLanger_Pexels.mp4"  # faces, digital-silence sound track
    faces = run_conversation(predictor, one("f", (0.0, 3.0), (3.0, 6.0)), MediaInput(video=silent), "cpu")
    for utt in faces["utterances"]:
        assert set(utt["readings"]) == {"face"} and utt["readings"]["face"]["frames"] >= 1


@needs_shared
def test_a_tenth_of_a_second_and_uncuttable_transcripts(predictor) -> None:
    short = run_conversation(predictor, one("short", (0.5, 0.6)), MediaInput(video=CREMAD), "cpu")
    readings = short["utterances"][0].get("readings", {})
    for name, reading in readings.items():
        assert_distribution(reading, short["readings"][name]["labels"])
    if "voice" in readings:
        assert readings["voice"]["speech_seconds"] <= 0.1
    if "face" in readings:
        assert readings["face"]["frames"] <= readings["face"]["frames_sampled"] <= 1
    # a text-only bundle with several utterances but no times: readings are skipped, the text is still scored
    untimed = parse_conversation({"utterances": [{"speaker": "a", "text": "hi"}, {"speaker": "b", "text": "yo"}]}, "t")
    result = run_conversation(predictor, untimed, MediaInput(video=CREMAD), "cpu")
    assert [u["modalities"] for u in result["utterances"]] == [["text"], ["text"]]
    assert all("readings" not in u for u in result["utterances"])
    json.dumps(result)  # the whole document is JSON


@needs_shared
@pytest.mark.slow
def test_worker_job_results_carry_readings(tmp_path: Path) -> None:
    """The job runner's code path (service.jobs.runner) gets readings from the pipeline unchanged."""
    import shutil

    from service.jobs.runner import run_conversation_job
    from service.settings import Settings

    shutil.copy(CREMAD, tmp_path / "video.flv")
    conv = {"id": "job", "utterances": [{"speaker": "A", "text": "Don't forget a jacket.", "start": 0.0, "end": 2.2}]}
    request = {"conversation": conv, "media": {"video": {"file": "video.flv"}}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    settings = Settings(weights_dir=ROOT / "weights", device="cpu", data_dir=tmp_path / "data")
    result = run_conversation_job(str(tmp_path), "dmd-meld7", settings)["result"]
    assert set(result["utterances"][0]["readings"]) == {"face", "voice"}
    assert set(result["readings"]) == {"face", "voice"} and result["utterances"][0]["modalities"] == ["text"]
