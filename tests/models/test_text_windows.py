"""Context windows of the fine-tuned text encoder: speakers, order, no future where not allowed, no labels."""

from __future__ import annotations

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
