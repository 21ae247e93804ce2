"""Inference batching of the fine-tuned text encoder: tokenized once, length batches, same vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.text_finetune import (
    ContextWindow,
    TextClassifier,
    _length_batches,
    pad_batch,
    predict_pairs,
    tokenize_all,
    tokenize_pairs,
    window_pairs,
)

SPEAKERS = ["Ann", "Bob"] * 6
TEXTS = [
    "hi",
    "hello there, how have you been all this long and rainy week?",
    "fine",
    "I really cannot believe what you just told me about the money",
    "ok",
    "we should go to the party tomorrow night with everyone from work",
    "no",
    "why not",
    "because I am tired",
    "that is a shame, it would have been a great night out for us",
    "sure",
    "bye",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[object, torch.nn.Module]:
    """(tokenizer, encoder) of the packaged MiniLM; skipped where it is not installed."""
    transformers = pytest.importorskip("transformers")
    from service.features.text import _resolve_source

    try:
        where = str(_resolve_source("minilm-l6-v2", None).locate())
    except Exception as exc:  # any reason the packaged encoder is unavailable
        pytest.skip(f"packaged MiniLM unavailable: {exc}")
    tok = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
    return tok, transformers.AutoModel.from_pretrained(where, local_files_only=True).eval()


def _pairs() -> list[tuple[str, str]]:
    return [p for p in window_pairs(SPEAKERS, TEXTS, ContextWindow(past=2, future=0)) if p]


def test_tokenized_once_equals_the_padded_batch(minilm) -> None:
    tok, _ = minilm
    pairs = _pairs()
    reference = tokenize_pairs(tok, pairs, 32)  # some pairs are truncated at 32 tokens
    ours = pad_batch(tokenize_all(tok, pairs, 32), tok.pad_token_id)
    assert set(ours) == set(reference)
    for k in reference:
        assert torch.equal(ours[k], reference[k]), k
    assert int(reference["attention_mask"].sum(1).max()) == 32


def test_length_batches_bound_size_and_padding() -> None:
    lengths = [10, 11, 12, 13, 20, 21, 40, 41, 42]
    order = list(range(len(lengths)))
    assert _length_batches(order, lengths, 64, None) == [order]
    assert _length_batches(order, lengths, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    batches = _length_batches(order, lengths, 64, 0.25)
    assert batches == [[0, 1, 2], [3], [4, 5], [6, 7, 8]]
    assert all(lengths[b[-1]] <= 1.25 * lengths[b[0]] for b in batches)


def test_length_batches_give_the_same_vectors(minilm) -> None:
    tok, encoder = minilm
    torch.manual_seed(0)
    model = TextClassifier(encoder, 384, 3, "target-mean").eval()
    pairs = _pairs()
    one, p1 = predict_pairs(model, tok, pairs, 80, "cpu")
    split, p2 = predict_pairs(model, tok, pairs, 80, "cpu", max_padding=0.25)
    np.testing.assert_allclose(split, one, atol=1e-5)
    np.testing.assert_allclose(p2, p1, atol=1e-5)
    alone = np.stack([predict_pairs(model, tok, [p], 80, "cpu")[0][0] for p in pairs[1:4]])
    np.testing.assert_allclose(alone, one[1:4], atol=1e-5)  # pairs with context: batch-independent
