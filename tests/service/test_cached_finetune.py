"""A fine-tune over cached lower-layer states (``cache_lower``) saves a normal extractor that serves unchanged.

The packaged MiniLM, LoRA on its top 2 layers, a few epochs on the tiny three-class dataset of
test_finetuned_text: the saved extractor, loaded through the serving code
(:class:`service.features.finetuned.FinetunedTextEncoder`), gives the dev vectors the training saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data import read_jsonl
from models.text_finetune import ContextWindow, FineTuneConfig
from tests.service.test_finetuned_text import _write_dataset

WINDOWS = {
    "pairs": ContextWindow(past=1, max_length=48),
    "conversation": ContextWindow(past=2, mode="conversation", chunk=2, turn_tokens=24, windowed=True),
}


@pytest.mark.parametrize("mode", list(WINDOWS))
def test_cached_finetune_serves_its_training_vectors(mode: str, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import service.offline.text_finetuning as tf
    from models.text_cached import CachedChunkTask, CachedPairTask
    from service.features.finetuned import FinetunedTextEncoder, spec_entry

    data = _write_dataset(tmp_path / "tiny3")
    cfg = FineTuneConfig(
        window=WINDOWS[mode],
        lora_layers=2,
        cache_lower=True,
        lr=3e-3,
        head_lr=3e-2,
        epochs=3,
        batch_size=4,
        patience=100,
    )
    captured = {}
    original = tf.finetune_text_encoder

    def keep(*args, **kwargs):
        model, history = original(*args, **kwargs)
        captured["model"], captured["args"] = model, args
        return model, history

    tf.finetune_text_encoder = keep
    try:
        meta = tf.finetune_text(data, "minilm-l6-v2", tmp_path / "ext", cfg, "cpu", False, cache_features=False)
    finally:
        tf.finetune_text_encoder = original
    assert meta["config"]["cache_lower"] is True and len(meta["history"]) == 3
    assert meta["best_dev"]["dev_accuracy"] >= 60.0, meta["history"]
    model = captured["model"]
    _, tokenizer, _, train, dev, *_ = captured["args"]
    if mode == "pairs":
        task = CachedPairTask(model, tokenizer, train, dev, cfg, "cpu", None)
    else:
        task = CachedChunkTask(model, tokenizer, train, dev, cfg, None, "cpu", None)
    _, _, trained = task.dev_predict(model, "cpu", False)  # the training-time vectors (dev cache)
    served = FinetunedTextEncoder(spec_entry(tmp_path / "ext", "cached"), tmp_path / "ext", "cpu", use_disk_cache=False)
    vectors = served.conversation_vectors(read_jsonl(data / "dev.jsonl"))
    np.testing.assert_allclose(np.stack([v for conv in vectors for v in conv]), trained, atol=1e-4)
