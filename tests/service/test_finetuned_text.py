"""The fine-tuned, context-aware text encoder end to end on CPU: fine-tune, bundle, refuse, serve.

A tiny synthetic dataset (three unmistakable classes) over the packaged MiniLM: a few LoRA steps must
fit it; the saved extractor must reproduce the in-memory model's features; a bundle whose adapter
changed must be refused; ``merc serve`` must serve the bundle, append included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.data import DataError, read_jsonl
from models.text_finetune import ContextWindow, FineTuneConfig, conversation_pairs, predict_pairs

LABELS = ["neutral", "joy", "anger"]
LINES = {
    "joy": ["I love this, it is wonderful!", "What a fantastic day, I am so happy!"],
    "anger": ["I hate this, it is terrible!", "Get out, you make me furious!"],
    "neutral": ["The train leaves at noon.", "The report is on the desk."],
}


def _write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    convs = []
    for c in range(4):
        utts = []
        for i, label in enumerate(["joy", "neutral", "anger", "neutral", "joy", "anger"]):
            text = LINES[label][(c + i) % 2]
            utts.append({"id": f"c{c}u{i}", "speaker": ["Ann", "Bob"][i % 2], "text": text, "label": label})
        convs.append({"id": f"c{c}", "utterances": utts})
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"name": "tiny3", "labels": LABELS, "modalities_inline": []}))
    return folder


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """(dataset folder, extractor folder, the in-memory fine-tuned classifier)."""
    pytest.importorskip("peft")
    from service.offline.text_finetuning import finetune_text

    root = tmp_path_factory.mktemp("ft")
    data = _write_dataset(root / "tiny3")
    cfg = FineTuneConfig(
        window=ContextWindow(past=1, future=0, max_length=48),
        lr=3e-3,
        head_lr=3e-2,
        epochs=12,
        batch_size=8,
        patience=100,
        seed=0,
    )
    captured = {}
    import service.offline.text_finetuning as tf

    original = tf.finetune_text_encoder

    def keep(*args, **kwargs):
        model, history = original(*args, **kwargs)
        captured["model"] = model
        return model, history

    tf.finetune_text_encoder = keep
    try:
        meta = finetune_text(data, "minilm-l6-v2", root / "extractor", cfg, device="cpu", progress=False)
    finally:
        tf.finetune_text_encoder = original
    assert meta["best_dev"]["dev_accuracy"] == 100.0, meta["history"]
    return data, root / "extractor", captured["model"]


def test_tiny_finetune_fits_and_reloads_identically(extractor) -> None:
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    data, folder, model = extractor
    convs = read_jsonl(data / "dev.jsonl")
    window = ContextWindow(past=1, future=0, max_length=48)
    pairs = [p for conv in conversation_pairs(convs, window) for p in conv if p]
    from transformers import AutoTokenizer

    from service.features.text import _resolve_source

    tok = AutoTokenizer.from_pretrained(str(_resolve_source("minilm-l6-v2", None).locate()))
    in_memory, probs = predict_pairs(model.to("cpu"), tok, pairs, 48, "cpu")
    assert (probs.argmax(1) == [LABELS.index(u.label) for c in convs for u in c.utterances]).all()
    loaded = FinetunedTextEncoder(spec_entry(folder, "tiny"), folder, "cpu", use_disk_cache=False)
    vectors = loaded.conversation_vectors(convs)
    flat = np.stack([v for conv in vectors for v in conv])
    np.testing.assert_allclose(flat, in_memory, atol=1e-4)


@pytest.fixture(scope="module")
def bundle(extractor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.offline.training import train_bundle

    data, folder, _ = extractor
    weights = tmp_path_factory.mktemp("weights")
    out = weights / "sdt-tiny3"
    train_bundle(  # the recipe this fixture was tuned with (tiny3 is a dataset of unknown name: pinned here)
        "sdt",
        data,
        out,
        text_encoder=str(folder),
        train_overrides={"epochs": 3, "device": "cpu", "class_weights": True},
        model_overrides={"temperature": 1.0},
        progress=False,
    )
    return out


def test_bundle_carries_its_extractor_and_predicts(bundle: Path, extractor) -> None:
    from service.inference.pipeline import run_conversation
    from service.inference.predictor import Predictor

    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["feature_spec"]["text"]
    assert entry["extractor"].startswith("finetuned:") and entry["adapter"] == "text_encoder"
    assert entry["context"] == {"past": 1, "future": 0, "speaker": True, "max_length": 48}
    assert len(entry["adapter_sha256"]) == 64 and entry["base"] == "minilm-l6-v2"
    convs = read_jsonl(extractor[0] / "dev.jsonl")
    result = run_conversation(Predictor(bundle, "cpu"), convs[0], None, "cpu")
    assert result["text_context"] == {"encoder": entry["extractor"], "past": 1, "future": 0, "speaker": True}
    assert len(result["utterances"]) == 6 and all(u["modalities"] == ["text"] for u in result["utterances"])


def test_changed_adapter_is_refused(bundle: Path, tmp_path: Path) -> None:
    from service.features.finetuned import get_finetuned_encoder
    from service.inference.predictor import Predictor

    copy = tmp_path / "sdt-tampered"
    shutil.copytree(bundle, copy)
    head = copy / "text_encoder" / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-1] ^= 0xFF
    head.write_bytes(bytes(raw))
    predictor = Predictor(copy, "cpu")
    with pytest.raises(DataError, match="differ from the ones the bundle was trained with"):
        get_finetuned_encoder(predictor.feature_spec["text"], None, "cpu")
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(DataError, match="missing"):
        get_finetuned_encoder(Predictor(copy, "cpu").feature_spec["text"], None, "cpu")


def test_service_serves_the_finetuned_bundle_with_append(bundle: Path, tmp_path: Path) -> None:
    from tests.api.conftest import Server

    server = Server(
        tmp_path / "data", tmp_path / "cache", MERC_WEIGHTS_DIR=str(bundle.parent), MERC_DEFAULT_MODEL=bundle.name
    ).start()
    try:
        with server.client() as api:
            turns = [{"speaker": "Ann", "text": LINES["joy"][0]}, {"speaker": "Bob", "text": LINES["anger"][0]}]
            job = api.post("/v1/conversations?wait=60", json={"model": bundle.name, "utterances": turns})
            assert job.status_code == 200, job.text
            body = job.json()
            assert body["status"] == "succeeded"
            assert body["result"]["text_context"]["past"] == 1
            new = api.post(
                f"/v1/conversations/{body['id']}/utterances?wait=60",
                json={"utterances": [{"speaker": "Ann", "text": LINES["neutral"][0]}]},
            )
            assert new.status_code == 200, new.text
            appended = new.json()["utterances"]
            assert [u["index"] for u in appended] == [2]
            assert abs(sum(appended[0]["distribution"].values()) - 1) < 1e-4
            full = api.get(f"/v1/conversations/{body['id']}").json()
            assert full["result"]["text_context"]["future"] == 0
            assert len(full["result"]["utterances"]) == 3
    finally:
        server.stop()


def test_out_of_fold_train_features(extractor, tmp_path: Path) -> None:
    from service.features.finetuned import FinetunedTextEncoder, spec_entry
    from service.offline.text_finetuning import oof_features
    from service.offline.training import train_bundle

    data, folder, _ = extractor
    copy = tmp_path / "extractor"
    shutil.copytree(folder, copy)
    path = oof_features(copy, data, folds=2, device="cpu", progress=False, epochs=2)
    stored = np.load(path)
    convs = read_jsonl(data / "train.jsonl")
    assert sorted(stored.files) == sorted(c.id for c in convs)
    assert all(stored[c.id].shape == (6, 384) and not np.isnan(stored[c.id]).any() for c in convs)
    full = FinetunedTextEncoder(spec_entry(copy, "x"), copy, "cpu", use_disk_cache=False).conversation_vectors(convs)
    assert not np.allclose(np.stack(full[0]), stored[convs[0].id].astype(np.float32), atol=1e-2)  # other models
    out = tmp_path / "sdt-oof"
    manifest = train_bundle(
        "sdt",
        data,
        out,
        text_encoder=str(copy),
        train_overrides={"epochs": 1, "device": "cpu"},
        progress=False,
        finetune_overrides={"oof": True},
    )
    assert "oof_features" not in manifest["feature_spec"]["text"]  # training-only: never in the bundle
    assert not (out / "text_encoder" / "oof").exists()


# ---------------------------------------------------------------- conversation mode (models.text_chunks)

CONV_WINDOW = ContextWindow(past=1, future=0, mode="conversation", chunk=2, turn_tokens=24)


@pytest.fixture(scope="module")
def conv_extractor(extractor, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset folder, extractor folder) of a conversation-mode fine-tune on the tiny dataset, warm-started
    from the pair-mode extractor (as the default bundle's was)."""
    from service.features.finetuned import extractor_hash
    from service.offline.text_finetuning import finetune_text

    root = tmp_path_factory.mktemp("ftconv")
    data = _write_dataset(root / "tiny3")
    cfg = FineTuneConfig(
        window=CONV_WINDOW, lr=1e-3, head_lr=1e-2, epochs=4, batch_size=4, patience=100, seed=0, init=str(extractor[1])
    )
    meta = finetune_text(data, "minilm-l6-v2", root / "extractor", cfg, device="cpu", progress=False)
    assert meta["best_dev"]["dev_accuracy"] >= 90.0, meta["history"]
    assert meta["config"]["window"]["mode"] == "conversation"
    assert meta["init_sha256"] == extractor_hash(extractor[1])
    return data, root / "extractor"


def test_conversation_mode_is_turn_causal_and_appends_match(conv_extractor) -> None:
    """A turn's vector depends on earlier turns only: the same whole, cut short, or appended turn by turn."""
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    data, folder = conv_extractor
    entry = spec_entry(folder, "tiny-conv")
    assert entry["context"]["mode"] == "conversation" and entry["context"]["chunk"] == 2
    enc = FinetunedTextEncoder(entry, folder, "cpu", use_disk_cache=False)
    conv = read_jsonl(data / "dev.jsonl")[0]
    whole = np.stack(enc.conversation_vectors([conv])[0])  # (6, 384)
    for k in range(1, 6):  # a chat: turn k scored when it arrives, earlier turns as context only
        enc._cache.clear()
        row = enc.conversation_vectors([conv], future_known=False, first=[k])[0]
        assert all(v is None for v in row[:k])
        np.testing.assert_allclose(row[k], whole[k], atol=1e-5)
        enc._cache.clear()
        cut = type(conv)(id=conv.id, utterances=conv.utterances[: k + 1])
        np.testing.assert_allclose(np.stack(enc.conversation_vectors([cut])[0]), whole[: k + 1], atol=1e-5)
    assert not np.allclose(whole[1], whole[3], atol=1e-3)  # the same line in another context differs


@pytest.fixture(params=[False, True], ids=["turn-causal", "windowed"])
def conv_folder(request: pytest.FixtureRequest, conv_extractor, tmp_path: Path) -> tuple[Path, Path]:
    """The conversation-mode extractor as trained, and a copy whose turns attend to their ``past`` turns
    only (``ContextWindow.windowed``: a different mask over the same weights)."""
    data, folder = conv_extractor
    if not request.param:
        return data, folder
    copy = tmp_path / "windowed"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "finetune.json").read_text())
    meta["config"]["window"]["windowed"] = True
    (copy / "finetune.json").write_text(json.dumps(meta))
    return data, copy


def test_conversation_mode_appends_reuse_the_open_chunk(conv_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat turn by turn: an append into an open chunk encodes its new turn only, after the cached keys
    and values of the chunk's earlier tokens, and equals transformers' forward on the whole conversation."""
    import torch

    from models.data import Conversation
    from service.features.finetuned import ChunkKVCache, FinetunedTextEncoder, spec_entry

    data, folder = conv_folder
    entry = spec_entry(folder, "tiny-conv")
    conv = read_jsonl(data / "dev.jsonl")[0]
    monkeypatch.setenv("MERC_TEXT_KV_CACHE_MB", "0")  # off: transformers' own forward (forward_chunks)
    reference = FinetunedTextEncoder(entry, folder, "cpu", use_disk_cache=False)
    whole = np.stack(reference.conversation_vectors([conv])[0])
    monkeypatch.delenv("MERC_TEXT_KV_CACHE_MB")
    enc = FinetunedTextEncoder(entry, folder, "cpu", use_disk_cache=False)
    for k in range(len(conv.utterances)):  # turn 0 posted, then one append per turn
        cut = Conversation(id=conv.id, utterances=conv.utterances[: k + 1])
        row = enc.conversation_vectors([cut], future_known=False, first=[k])[0]
        np.testing.assert_allclose(row[k], whole[k], atol=1e-5)
    # every append found its keys/values: turns 1, 3, 5 those of the chunk opened by 0, 2, 4; turns 2 and 4
    # those of their chunk's first tokens ([CLS] + the turn before), computed when 1 and 3 filled theirs
    assert (enc.kv_cache.hits, enc.kv_cache.misses) == (5, 0)
    assert enc.kv_cache.used > 0  # turn 5 filled its chunk: the next one's first tokens wait
    from dataclasses import replace

    convs = [  # a micro-batch: three chats, pasts of other lengths, no line shared (that would be a cache hit)
        replace(c, utterances=[replace(u, text=f"{u.text} {'x' * (i + 1)} {j}") for j, u in enumerate(c.utterances)])
        for i, c in enumerate(read_jsonl(data / "train.jsonl")[:3])
    ]
    wholes = [np.stack(v) for v in reference.conversation_vectors(convs)]
    for k in range(3):
        cuts = [Conversation(id=c.id, utterances=c.utterances[: k + 1]) for c in convs]
        rows = enc.conversation_vectors(cuts, future_known=False, first=[k] * 3)
        for row, whole_c in zip(rows, wholes, strict=True):
            np.testing.assert_allclose(row[k], whole_c[k], atol=1e-5)
    assert enc.kv_cache.hits == 5 + 3 + 3  # turns 1 and 2 of the three, extended together
    small = ChunkKVCache(budget=2 * 4 * 8)  # room for one (1 layer: keys + values of 8 floats)
    pair = [(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))]
    small.put("a", pair)
    small.put("b", pair)
    assert small.pop("a") is None and small.pop("b") is pair and small.used == 0


def test_conversation_mode_costs_each_turn_once(conv_extractor) -> None:
    from transformers import AutoTokenizer

    from models.text_chunks import chunk_conversation, tokenize_turns
    from models.text_finetune import conversation_turns
    from service.features.text import _resolve_source

    data, _ = conv_extractor
    tok = AutoTokenizer.from_pretrained(str(_resolve_source("minilm-l6-v2", None).locate()))
    convs = read_jsonl(data / "dev.jsonl")
    turns = conversation_turns(convs, CONV_WINDOW)[0]
    ids = tokenize_turns(tok, turns, 24)
    chunks = chunk_conversation(ids, tok.cls_token_id, tok.sep_token_id, past=1, chunk=2)
    assert [c.outputs for c in chunks] == [[(0, 0), (1, 1)], [(2, 1), (3, 2)], [(4, 1), (5, 2)]]
    encoded = sum(len(c.input_ids) for c in chunks)
    own = sum(len(t) + 1 for t in ids)
    carried = (len(ids[1]) + 1) + (len(ids[3]) + 1)  # the turn before chunks 2 and 3, again
    assert encoded == own + carried + len(chunks)  # + one [CLS] per chunk; pairs would encode ~2x own


def test_out_of_fold_features_in_conversation_mode(conv_extractor, tmp_path: Path) -> None:
    """Conversation mode too; the folds start cold (the extractor's warm start saw every label), run one
    per call (--fold), and a later call merges them without fitting again."""
    from service.offline.text_finetuning import oof_features

    data, folder = conv_extractor
    copy = tmp_path / "extractor"
    shutil.copytree(folder, copy)
    part = oof_features(copy, data, folds=2, device="cpu", progress=False, epochs=1, only_fold=1)
    assert part.name == "fold-1.npz" and not (copy / "oof" / "train_features.npz").exists()
    stamp = part.stat().st_mtime_ns
    path = oof_features(copy, data, folds=2, device="cpu", progress=False, epochs=1)
    assert part.stat().st_mtime_ns == stamp  # fold 1 reused, fold 0 fitted, both merged
    report = json.loads((copy / "oof" / "oof.json").read_text())
    assert report["config"]["init"] is None and report["config"]["window"]["mode"] == "conversation"
    assert [r["fold"] for r in report["report"]] == [0, 1]
    stored = np.load(path)
    convs = read_jsonl(data / "train.jsonl")
    assert sorted(stored.files) == sorted(c.id for c in convs)
    assert all(stored[c.id].shape == (6, 384) and np.isfinite(stored[c.id]).all() for c in convs)


def test_distilled_conversation_mode_approaches_its_teacher(
    extractor, conv_extractor, bundle: Path, tmp_path: Path
) -> None:
    """A conversation-mode student distilled from the pair-mode extractor: its vectors move towards the
    teacher's (standardised error on dev falls from the warm start's), selection is on that error, the
    teacher is named by hash; `merc rebase-text` serves the teacher's fusion model on the student, and
    refuses an extractor that was not distilled from the bundle's encoder."""
    from service.features.finetuned import FinetunedTextEncoder, extractor_hash, spec_entry
    from service.offline.text_finetuning import finetune_text, teacher_vectors

    data, teacher = extractor[0], extractor[1]
    cfg = FineTuneConfig(
        window=CONV_WINDOW,
        lr=1e-3,
        head_lr=1e-2,
        epochs=4,
        batch_size=4,
        patience=100,
        seed=0,
        init=str(conv_extractor[1]),
        distill=str(teacher),
        distill_weight=4.0,
    )
    meta = finetune_text(data, "minilm-l6-v2", tmp_path / "student", cfg, device="cpu", progress=False)
    assert meta["distill_sha256"] == extractor_hash(teacher)
    errors = [h["dev_distill_mse"] for h in meta["history"]]
    assert meta["best_dev"]["dev_distill_mse"] == min(errors)

    dev = read_jsonl(data / "dev.jsonl")
    (target,) = teacher_vectors(teacher, [dev], "cpu")

    def error(folder: Path) -> float:
        enc = FinetunedTextEncoder(spec_entry(folder, folder.name), folder, "cpu", use_disk_cache=False)
        got = [np.stack([v for v in row if v is not None]) for row in enc.conversation_vectors(dev)]
        std = np.concatenate(target).std(0)
        scale = np.where(std > 1e-4, std, 1.0)
        return float(np.mean(((np.concatenate(got) - np.concatenate(target)) / scale) ** 2))

    before, after = error(conv_extractor[1]), error(tmp_path / "student")
    assert after < 0.5 * before, (before, after)
    with pytest.raises(ValueError, match="conversation mode"):
        finetune_text(
            data,
            "minilm-l6-v2",
            tmp_path / "pairs",
            FineTuneConfig(distill=str(teacher), max_steps=1),
            device="cpu",
            progress=False,
        )
    from service.inference.pipeline import run_conversation
    from service.inference.predictor import Predictor
    from service.offline.training import rebase_text_bundle

    out = tmp_path / "weights" / "sdt-tiny3-fast"
    manifest = rebase_text_bundle(bundle, tmp_path / "student", out, data)
    entry = manifest["feature_spec"]["text"]
    assert entry["context"]["mode"] == "conversation" and entry["adapter"] == "text_encoder"
    assert entry["adapter_sha256"] == extractor_hash(tmp_path / "student")
    assert manifest["rebased"]["teacher_text"]["adapter_sha256"] == extractor_hash(teacher)
    assert json.loads((out / "dev_metrics.json").read_text())["weighted_f1"] == manifest["dev_metrics"]["weighted_f1"]
    result = run_conversation(Predictor(out, "cpu"), dev[0], None, "cpu")
    assert [u["emotion"] for u in result["utterances"]] == [u.label for u in dev[0].utterances]
    with pytest.raises(ValueError, match="not distilled from"):
        rebase_text_bundle(bundle, conv_extractor[1], tmp_path / "other", data)
    rebase_text_bundle(bundle, tmp_path / "student", out, data)  # an earlier rebase is replaced
    with pytest.raises(ValueError, match="not a bundle written by merc rebase-text"):
        rebase_text_bundle(bundle, tmp_path / "student", tmp_path / "student", data)  # never anything else
    assert (tmp_path / "student" / "finetune.json").is_file()
