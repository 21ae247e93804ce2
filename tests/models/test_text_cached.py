"""Top layers over cached lower-layer states (models.text_cached) equal the full model, BERT and MPNet.

Tiny random BERT- and MPNet-shaped encoders (4 layers, LoRA on the top 2 with random adapter weights)
over the packaged MiniLM tokenizer: in eval mode, the pooled vectors of the cached top-layer forward
must equal the full model's, in pair mode and conversation mode (turn-causal and windowed masks).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models.data import Conversation, Utterance
from models.text_finetune import (
    ContextWindow,
    FineTuneConfig,
    TextClassifier,
    _ChunkTask,
    _PairTask,
    conversation_inputs,
    pad_batch,
    wrap_encoder,
)

LINES = ["I love this, it is wonderful!", "The train leaves at noon.", "Get out, you make me furious!", "ok", "sure"]


@pytest.fixture(scope="module")
def tokenizer() -> object:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from service.features.text import _resolve_source

    try:
        where = str(_resolve_source("minilm-l6-v2", None).locate())
    except Exception as exc:  # any reason the packaged encoder is unavailable
        pytest.skip(f"packaged MiniLM unavailable: {exc}")
    return transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)


def _convs(n: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for c in range(n):
        utts = [
            Utterance(f"c{c}u{i}", ["Ann", "Bob"][i % 2], rng.choice(LINES), label=rng.choice(["a", "b", "c"]))
            for i in range(rng.randrange(3, 9))
        ]
        out.append(Conversation(f"c{c}", utts))
    return out


def _data(window: ContextWindow) -> tuple[tuple[list, list], tuple[list, list]]:
    def split(convs: list[Conversation]) -> tuple[list, list]:
        labels = [["abc".index(u.label) for u in c.utterances] for c in convs]  # type: ignore[arg-type]
        return conversation_inputs(convs, window), labels

    return split(_convs(5, 0)), split(_convs(3, 1))


def _encoder(kind: str, tokenizer: object) -> torch.nn.Module:
    """A tiny random (seeded) encoder of ``kind``: 4 layers, 32 wide."""
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    size = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
    vocab, pad = tokenizer.vocab_size, tokenizer.pad_token_id  # type: ignore[attr-defined]
    if kind == "mpnet":
        return MPNetModel(MPNetConfig(vocab_size=vocab, pad_token_id=pad, **size))
    config = BertConfig(vocab_size=vocab, pad_token_id=pad, **size)
    config._attn_implementation = kind.split("-")[1]
    return BertModel(config)


def _model(kind: str, tokenizer: object, cfg: FineTuneConfig) -> TextClassifier:
    """:func:`_encoder` with LoRA on its top 2 of 4 layers (adapter weights random)."""
    model = TextClassifier(wrap_encoder(_encoder(kind, tokenizer), cfg), 32, 3, cfg.pooling)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


KINDS = ["bert-sdpa", "bert-eager", "mpnet"]
WINDOWS = {
    "pairs": ContextWindow(past=2, max_length=40),
    "conversation": ContextWindow(past=2, mode="conversation", chunk=3, turn_tokens=16),
    "windowed": ContextWindow(past=1, mode="conversation", chunk=3, turn_tokens=16, windowed=True),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(WINDOWS))
def test_cached_top_layers_equal_the_full_model(tokenizer, kind: str, mode: str) -> None:
    from models.text_cached import cached_task

    cfg = FineTuneConfig(window=WINDOWS[mode], lora_layers=2, cache_lower=True, cache_alignments=2)
    model = _model(kind, tokenizer, cfg)
    train, dev = _data(cfg.window)
    task = cached_task(model, tokenizer, train, dev, cfg, None, "cpu", None)
    assert task.start == 2
    full = _ChunkTask(tokenizer, train, dev, cfg) if mode != "pairs" else _PairTask(tokenizer, train, dev, cfg)
    y_full, p_full, v_full = full.dev_predict(model, "cpu", False)
    y, p, v = task.dev_predict(model, "cpu", False)
    np.testing.assert_array_equal(y, y_full)
    np.testing.assert_allclose(v, v_full, atol=1e-5)
    np.testing.assert_allclose(p, p_full, atol=1e-5)
    # training inputs: float32 states give the full model's vectors; the float16 store stays close
    if mode == "pairs":
        items = task.items
        idx = list(range(len(items)))
        expected = model(pad_batch([items[i] for i in idx], tokenizer.pad_token_id))[0].detach()
    else:
        items = task.chunks
        idx = list(range(len(items)))
        from models.text_chunks import pad_chunks

        part = [items[i] for i in idx]
        expected = model.forward_chunks(pad_chunks(part, tokenizer.pad_token_id, cfg.window.reach), part)[0].detach()
    exact = task._store(items, np.float32, "fp32")
    with torch.no_grad():
        np.testing.assert_allclose(task.forward_cached(model, exact, items, idx)[0], expected, atol=1e-5)
        half = task.forward_cached(model, task.store, items, idx)[0]
    assert float((half - expected).abs().max()) < 2e-2 * float(expected.abs().max())


def test_alignments_and_epoch_draws(tokenizer) -> None:
    from models.text_cached import alignment_offsets, cached_task

    assert alignment_offsets(8, 2) == [0, 4] and alignment_offsets(3, 5) == [0, 1, 2] and alignment_offsets(4, 1) == [0]
    cfg = FineTuneConfig(window=WINDOWS["conversation"], lora_layers=2, cache_lower=True, batch_size=6)
    model = _model("bert-sdpa", tokenizer, cfg)
    train, dev = _data(cfg.window)
    task = cached_task(model, tokenizer, train, dev, cfg, None, "cpu", None)
    labelled = sum(len(row) for row in train[1])
    for seed in range(3):
        batches = task.epoch(random.Random(seed))
        assert sum(len(ys) for _, ys, _ in batches) == labelled  # every labelled turn once per epoch


def test_cache_lower_refuses_adapters_below_the_split(tokenizer) -> None:
    from models.text_cached import layer_split

    cfg = FineTuneConfig(window=WINDOWS["pairs"], cache_lower=True)
    with pytest.raises(ValueError, match="lora-layers"):
        layer_split(_model("mpnet", tokenizer, cfg), cfg)
    all_layers = _model("mpnet", tokenizer, cfg)  # adapters everywhere, then asked to cache 2 layers
    with pytest.raises(ValueError, match="below layer 2"):
        layer_split(all_layers, FineTuneConfig(window=WINDOWS["pairs"], cache_lower=True, lora_layers=2))


@pytest.mark.parametrize("mode", ["pairs", "windowed"])
def test_cached_run_resumes_over_its_kept_states(tokenizer, mode: str, tmp_path) -> None:
    """Stopped after 3 steps and resumed, a cached fine-tune ends with the uninterrupted run's weights; the
    resumed process reuses the states kept in the checkpoint folder, and they go when the run ends."""
    import models.text_cached as tc
    from models.text_checkpoint import Checkpointing, TrainingStopped, trainable_state
    from models.text_finetune import finetune_text_encoder

    cfg = FineTuneConfig(
        window=WINDOWS[mode], lora_layers=2, cache_lower=True, epochs=2, batch_size=4, patience=100, seed=1
    )
    train, dev = _data(cfg.window)

    def run(checkpoint: Checkpointing | None) -> dict:
        model, _ = finetune_text_encoder(
            _encoder("mpnet", tokenizer),
            tokenizer,
            32,
            train,
            dev,
            list("abc"),
            cfg,
            progress=None,
            show_bar=False,
            checkpoint=checkpoint,
        )
        return trainable_state(model)

    whole = run(None)
    folder = tmp_path / "ckpt"
    with pytest.raises(TrainingStopped):
        run(Checkpointing(folder, every=0, stop_at_step=3))
    kept = sorted(p.name for p in (folder / "lower-cache").iterdir())
    assert len(kept) == 4 and all(n.startswith("lower-") for n in kept)  # train and dev: states + marker
    filled = []
    original = tc.fill_store
    tc.fill_store = lambda *a, **k: filled.append(1) or original(*a, **k)
    try:
        resumed = run(Checkpointing(folder, every=0, resume=True))
    finally:
        tc.fill_store = original
    assert not filled and not (folder / "lower-cache").exists()
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)


def test_kept_states_continue_after_an_interruption(tokenizer, tmp_path, monkeypatch) -> None:
    """A process stopped while filling the kept states (one group marked) is continued, not restarted."""
    from models.text_cached import CachedChunkTask, cached_task
    from models.text_chunks import chunk_batches

    monkeypatch.setattr(CachedChunkTask, "group_tokens", 64)
    cfg = FineTuneConfig(window=WINDOWS["windowed"], lora_layers=2, cache_lower=True)
    model = _model("mpnet", tokenizer, cfg)
    train, dev = _data(cfg.window)
    whole = cached_task(model, tokenizer, train, dev, cfg, None, "cpu", None)
    keep = tmp_path / "keep"
    cached_task(model, tokenizer, train, dev, cfg, None, "cpu", None, keep)
    path = next(keep.glob("lower-train-*.npy"))
    groups = chunk_batches(whole.chunks, 64, 0.25)
    assert len(groups) > 2
    data = np.lib.format.open_memmap(path, "r+")
    rows = [slice(whole.store.offsets[i], whole.store.offsets[i + 1]) for i in range(len(whole.chunks))]
    for k, group in enumerate(groups):  # as if the process stopped after the first group
        for i in group:
            data[rows[i]] = 7.0 if k == 0 else np.nan  # 7: the first group's rows, never recomputed
    data.flush()
    del data
    path.with_suffix(".done").unlink()
    path.with_suffix(".part").write_text("1\n")
    again = cached_task(model, tokenizer, train, dev, cfg, None, "cpu", None, keep)
    assert again.store.ready and not path.with_suffix(".part").exists()
    for k, group in enumerate(groups):
        for i in group:
            expected = 7.0 if k == 0 else whole.store.data[rows[i]]
            np.testing.assert_array_equal(np.asarray(again.store.data[rows[i]]), expected)
