"""Context windows of the fine-tuned text encoder: speakers, order, no future where not allowed, no labels."""

from __future__ import annotations

import torch

from models.data import Conversation, Utterance
from models.text_finetune import ContextWindow, conversation_pairs, window_pairs

SPEAKERS = ["Ann", "Bob", "Ann", "Cid", "Bob"]
TEXTS = ["one", "two", None, "four", "five"]


def test_past_turns_nearest_first_with_speakers() -> None:
    pairs = window_pairs(SPEAKERS, TEXTS, ContextWindow(past=2, future=0))
    assert pairs[0] == ("Ann: one", "")
    assert pairs[1] == ("Bob: two", "before: Ann: one")
    assert pairs[2] is None  # no text: no input, and skipped as context
    assert pairs[3] == ("Cid: four", "before: Bob: two | Ann: one")
    assert pairs[4] == ("Bob: five", "before: Cid: four | Bob: two")


def test_future_only_when_the_whole_conversation_is_known() -> None:
    window = ContextWindow(past=1, future=1)
    known = window_pairs(SPEAKERS, TEXTS, window, future_known=True)
    live = window_pairs(SPEAKERS, TEXTS, window, future_known=False)
    assert known[1] == ("Bob: two", "next: Cid: four || before: Ann: one")
    assert live[1] == ("Bob: two", "before: Ann: one")
    assert all("next:" not in p[1] for p in live if p)
    assert known[4] == ("Bob: five", "before: Cid: four")  # nothing after the last turn


def test_no_speaker_prefix_and_first() -> None:
    pairs = window_pairs(SPEAKERS, TEXTS, ContextWindow(past=1, future=0, speaker=False), first=3)
    assert pairs[:3] == [None, None, None]
    assert pairs[3] == ("four", "before: two")


def test_labels_never_enter_the_input() -> None:
    utts = [
        Utterance(id=f"u{i}", speaker=s, text=t, label="anger")
        for i, (s, t) in enumerate(zip(SPEAKERS, TEXTS, strict=True))
    ]
    conv = Conversation(id="c", utterances=utts)
    flat = " ".join(
        a + " " + b for p in conversation_pairs([conv], ContextWindow(past=4, future=4))[0] if p for a, b in [p]
    )
    assert "anger" not in flat


def test_chunks_bounds_masks_and_random_alignment() -> None:
    import random

    from models.text_chunks import chunk_bounds, chunk_conversation, pad_chunks, training_chunks

    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(7, 3, offset=2) == [(0, 2), (2, 5), (5, 7)]
    tokens = [[10 + i] * (i + 1) for i in range(5)]  # turn i has i + 1 tokens
    chunks = chunk_conversation(tokens, 101, 102, past=2, chunk=2)
    assert [c.start for c in chunks] == [0, 0, 2]
    assert chunks[1].outputs == [(2, 2), (3, 3)] and chunks[1].input_ids[:3] == [101, 10, 102]
    assert chunks[2].turn_ids == [-1] + [0] * 4 + [1] * 5 + [2] * 6  # a turn's [SEP] is its own
    batch = pad_chunks(chunks, pad_id=0)
    mask = batch["attention_mask"][2]  # (L, L): row = query
    turn = torch.tensor(chunks[2].turn_ids)
    assert mask.shape == (len(turn), len(turn))
    assert bool(((turn[None, :] <= turn[:, None]) == mask.bool()).all())  # never a later turn
    assert mask[:, 0].all()  # [CLS] visible to all
    windowed = pad_chunks(chunks, pad_id=0, window=1)["attention_mask"][2].bool()  # a turn + the one before
    assert bool(
        (
            windowed
            == ((turn[None, :] <= turn[:, None]) & (turn[None, :] >= turn[:, None] - 1)) | (turn[None, :] == -1)
        ).all()
    )
    assert not windowed[-1, 1] and windowed[-1, 5] and windowed[-1, 0]  # turn 2 sees turn 1, not turn 0
    only = chunk_conversation(tokens, 101, 102, past=2, chunk=2, need=[False, False, True, False, False])
    assert len(only) == 1 and only[0].outputs == [(2, 2)] and only[0].turn_ids[-1] == 2  # stops after turn 2
    labels = [[0, -1, 1, 2, 0]]
    a, ya = training_chunks([tokens], labels, 101, 102, 2, 2, random.Random(0))
    assert sorted(i for c in a for i, _ in c.outputs) == [0, 2, 3, 4]  # unlabelled turn 1 is context only
    assert [y for row in ya for y in row] == [labels[0][i] for c in a for i, _ in c.outputs]
