"""The English voice reading (weights/readings/voice-en7): the label mapping onto MELD's seven, the training
on synthetic corpora in seconds, and the committed artefact loading with its description and licence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.features.voice_training import MELD7, TO_MELD7, corpus_metrics, map_label, train
from tests.service.media_helpers import ROOT

VOICE_EN = ROOT / "weights" / "readings" / "voice-en7"


def test_corpus_labels_map_onto_meld_and_boredom_is_dropped() -> None:
    ravdess = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    emodb = ["neutral", "anger", "boredom", "disgust", "fear", "happiness", "sadness"]
    assert [map_label(x, MELD7, TO_MELD7) for x in ravdess] == [
        "neutral", "neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise"]  # fmt: skip
    assert [map_label(x, MELD7, TO_MELD7) for x in emodb] == [
        "neutral", "anger", None, "disgust", "fear", "joy", "sadness"]  # fmt: skip
    assert map_label("calm", ravdess, None) == "calm" and map_label(None, MELD7, TO_MELD7) is None
    assert set(TO_MELD7.values()) <= set(MELD7)


def test_corpus_metrics_score_present_classes_and_the_corpus_own_labels() -> None:
    y = np.array([0, 0, 6, 6, -1])  # neutral (from neutral and calm), anger; -1 = dropped (boredom)
    raw = np.array(["neutral", "calm", "angry", "angry", "boredom"])
    pred = np.array([0, 6, 6, 0, 3])
    m = corpus_metrics(y, pred, raw, MELD7)
    assert m["per_class_recall"] == {"neutral": 50.0, "anger": 50.0} and m["uar"] == 50.0 and m["n"] == 4
    assert m["per_corpus_label_recall"] == {"angry": 50.0, "calm": 0.0, "neutral": 100.0}
    assert m["uar_corpus_labels"] == 50.0


def _corpus(folder: Path, name: str, labels: list[str], seed: int) -> Path:
    """A tiny dataset folder as merc extract writes it: sessions of one speaker, audio vectors inline;
    each label shifts the feature of its MELD counterpart (11 when it has none), so the classes are
    learnable across speakers and corpora."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    entry = {"extractor": "compare2016", "version": "opensmile==test", "dim": 12}
    (folder / "dataset.json").write_text(json.dumps({"name": name, "labels": labels, "feature_spec": {"audio": entry}}))
    for split, speakers in (("train", range(4)), ("dev", range(4, 6))):
        lines = []
        for s in speakers:
            offset = rng.normal(0, 3, 12)  # the speaker's voice
            utts = []
            for i in range(2 * len(labels)):
                x = offset + rng.normal(0, 0.3, 12)
                label = labels[i % len(labels)]
                target = map_label(label, MELD7, TO_MELD7)
                x[MELD7.index(target) if target else 11] += 2.0
                utts.append({"id": f"{name}{s}-{i}", "speaker": f"{name}{s}", "text": None, "label": label,
                             "features": {"audio": x.round(4).tolist()}})  # fmt: skip
            lines.append(json.dumps({"id": f"{name}-{s}", "utterances": utts}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_training_on_two_corpora_in_meld_labels(tmp_path: Path) -> None:
    from service.features.voice_reading import load_voice_model

    a = _corpus(
        tmp_path / "a", "ravdess8", ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"], 0
    )
    b = _corpus(tmp_path / "b", "emodb7", ["neutral", "anger", "boredom", "disgust", "fear", "happiness", "sadness"], 1)
    grid = {"shrink": (4.0,), "k_best": (12,), "C": (1.0,), "single_view": (False, True)}
    m = train([a, b], tmp_path / "out", "meld7", "merc-voice-test", grid)
    assert m["labels"] == MELD7 and len(m["selection"]["grid"]) == 2
    acc = m["accuracy"]["per_corpus"]
    assert set(acc) == {"ravdess8", "emodb7"} and acc["ravdess8"]["dev_uar"] > 80 and acc["emodb7"]["dev_uar"] > 80
    assert "surprise" not in acc["emodb7"]["dev_per_class_recall"]  # absent classes are not averaged in
    assert set(acc["ravdess8"]["dev_per_corpus_label_recall"]) >= {"calm", "neutral"}
    assert "boredom" in m["training_data"] and "NON-COMMERCIAL" in m["licence"] and "CC BY-NC-SA 4.0" in m["licence"]
    model = load_voice_model(tmp_path / "out")
    x = np.zeros(12)
    x[MELD7.index("anger")] += 2.0
    (p,) = model.predict([x], ["someone"])
    assert p is not None and p.shape == (7,) and abs(float(p.sum()) - 1) < 1e-4


def test_several_corpora_need_one_label_set(tmp_path: Path) -> None:
    a = _corpus(tmp_path / "a", "x", ["neutral", "calm"], 0)
    b = _corpus(tmp_path / "b", "y", ["neutral", "anger"], 1)
    with pytest.raises(ValueError, match="--labels"):
        train([a, b], tmp_path / "out")


@pytest.mark.skipif(not (VOICE_EN / "manifest.json").is_file(), reason="voice-en7 not built")
def test_committed_english_reading_loads_with_its_licence_and_accuracy() -> None:
    from service.features.voice_reading import DEFAULT_VOICE_MODEL, load_voice_model
    from service.inference.readings import voice_description

    assert DEFAULT_VOICE_MODEL == VOICE_EN  # the service's voice reading by default
    model = load_voice_model(VOICE_EN)
    d = voice_description(model)
    assert model.labels == MELD7 and d["model"] == "merc-voice-en7"
    assert "CC BY-NC-SA 4.0" in d["licence"] and "NON-COMMERCIAL" in d["licence"] and "Emo-DB" in d["licence"]
    per = d["accuracy"]["per_corpus"]
    assert per["ravdess8"]["dev_uar"] >= 55 and per["emodb7"]["dev_uar"] >= 55
    assert sum(f.stat().st_size for f in VOICE_EN.iterdir()) < 10_000_000


def test_quiet_speech_framed_by_silence_is_present_and_read() -> None:
    """Whole-cut RMS below the -60 dBFS floor, loud part above it (RAVDESS actor 20's calm takes): a vector
    and enough speech for a voice reading; digital silence and -70 dBFS noise stay absent."""
    from service.features.audio import OpenSmileExtractor, loud_dbfs, rms_dbfs
    from service.inference.readings import MIN_SPEECH_SECONDS, speech_seconds

    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    speech = (10 ** (-54 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # 0.5 s at -54 dBFS
    quiet = np.concatenate([np.zeros(24000, np.float32), speech, np.zeros(24000, np.float32)])
    noise = rng.normal(0, 10 ** (-70 / 20), 32000).astype(np.float32)
    assert rms_dbfs(quiet) < -60 < loud_dbfs(quiet) and loud_dbfs(noise) < -60
    out = OpenSmileExtractor("egemaps-v02", workers=1).extract([quiet, np.zeros(32000, np.float32), noise])
    assert out[0] is not None and out[1] is None and out[2] is None
    assert speech_seconds(quiet) >= MIN_SPEECH_SECONDS


def test_noisy_copy_is_described_as_a_copy_of_its_corpus(tmp_path: Path) -> None:
    from service.features.voice_training import corpus_about, load_corpus

    folder = _corpus(tmp_path / "n", "ravdess8-noisy", ["neutral", "angry"], 0)
    info = json.loads((folder / "dataset.json").read_text())
    info["augmentation"] = {"snr_db": [20.0, 40.0], "gain_db": 10.0}
    (folder / "dataset.json").write_text(json.dumps(info))
    about = corpus_about(load_corpus(folder, MELD7, TO_MELD7))
    assert "copy of ravdess8" in about["about"] and "[20.0, 40.0] dB" in about["about"]
    assert about["use"].startswith("NON-COMMERCIAL")  # the source's licence carries over
    plain = corpus_about(load_corpus(_corpus(tmp_path / "p", "mine", ["neutral"], 1), MELD7, TO_MELD7))
    assert plain["licence"] == "see the dataset"


def test_augmented_copy_is_noisy_seeded_and_keeps_length() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("augment_speech", ROOT / "scripts" / "augment_speech.py")
    assert spec and spec.loader
    aug = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aug)
    t = np.arange(16000) / 16000
    clean = np.concatenate([np.zeros(8000), 0.1 * np.sin(2 * np.pi * 200 * t), np.zeros(8000)]).astype(np.float32)
    a, b = aug.degrade(clean, "x.flac", (20.0, 20.0), 0.0), aug.degrade(clean, "x.flac", (20.0, 20.0), 0.0)
    assert len(a) == len(clean) and np.array_equal(a, b)  # same name, same copy
    pause = 20 * np.log10(np.sqrt(np.mean(a[:6000] ** 2)))
    assert -50 < pause < -30  # a noise floor about 20 dB under the speech (-23 dBFS), where there was silence
    assert not np.array_equal(a, aug.degrade(clean, "y.flac", (20.0, 20.0), 0.0))
