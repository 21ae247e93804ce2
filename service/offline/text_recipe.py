"""The one-command recipe: defaults chosen from the shape of a dataset nobody here has seen.

``merc train ARCH --data DIR --text-encoder finetune:BASE`` must do well on a new dataset without
flags. What the measurements here say (docs/results.md, "Long past context"): long dialogues
(IEMOCAP: ~48 turns, two speakers) gain from a long past window read in conversation mode, where each
turn is encoded once; short multi-party scenes (MELD: ~10 turns) gain little past two turns, and the
pair input reads them well. The choice follows the training conversations' length, and is printed
with its reason. Flags the user gives (``--set finetune.NAME=V``, ``--lr`` ...) always win.

For a dataset of no known family (models.train.dataset_family), the fusion model's training
defaults follow the same shape: short multi-party conversations take the recipe measured on MELD
with fine-tuned text (SDT: lr 1e-4, temperature 8, no class weights), long ones IEMOCAP's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LONG_DIALOGUE_TURNS = 20  # mean turns per conversation from which the long past window pays
LONG_PAST, LONG_CHUNK = 8, 8  # conversation mode, windowed: each turn reads its 8 previous turns
SHORT_PAST = 2  # pairs: the target and its 2 previous turns


@dataclass(frozen=True)
class DatasetShape:
    """What the recipe looks at: the training conversations' size and length."""

    conversations: int
    utterances: int
    mean_turns: float
    mean_speakers: float

    @property
    def long_dialogues(self) -> bool:
        return self.mean_turns >= LONG_DIALOGUE_TURNS


def dataset_shape(data_dir: Path) -> DatasetShape:
    """The shape of ``data_dir``/train.jsonl (turns and speakers per conversation)."""
    turns, speakers = [], []
    with open(Path(data_dir) / "train.jsonl") as f:
        for line in f:
            if line.strip():
                utts = json.loads(line).get("utterances") or []
                turns.append(len(utts))
                speakers.append(len({u.get("speaker") for u in utts}))
    if not turns:
        raise ValueError(f"{data_dir}/train.jsonl holds no conversations")
    return DatasetShape(len(turns), sum(turns), statistics.fmean(turns), statistics.fmean(speakers))


def turn_tokens_for(past: int, chunk: int, max_positions: int = 512, cap: int = 48) -> int:
    """The largest per-turn token limit whose chunk ([CLS] + (past + chunk) turns, each with its
    [SEP]) fits the encoder's position table."""
    return max(8, min(cap, (max_positions - 1) // (past + chunk) - 1))


def text_recipe(shape: DatasetShape, max_positions: int = 512) -> tuple[dict[str, Any], str]:
    """Fine-tune defaults (FineTuneConfig field -> value; window fields flat) and why."""
    epochs = 4 if shape.utterances < 4000 else 3
    if shape.long_dialogues:
        tokens = turn_tokens_for(LONG_PAST, LONG_CHUNK, max_positions)
        window = dict(mode="conversation", windowed=True, past=LONG_PAST, chunk=LONG_CHUNK, turn_tokens=tokens)
        why = (
            f"conversations average {shape.mean_turns:.1f} turns (>= {LONG_DIALOGUE_TURNS}): conversation mode, "
            f"each turn reads its {LONG_PAST} previous turns (windowed, chunks of {LONG_CHUNK}, {tokens} tokens a turn)"
        )
    else:
        window = dict(mode="pairs", past=SHORT_PAST, max_length=96)
        why = (
            f"conversations average {shape.mean_turns:.1f} turns (< {LONG_DIALOGUE_TURNS}): pairs, the target "
            f"with its {SHORT_PAST} previous turns"
        )
    why += f"; {epochs} epochs for {shape.utterances} training utterances, best evaluation on dev kept"
    return {**window, "epochs": epochs, "evals_per_epoch": 2, "patience": 3}, why


def fusion_family(shape: DatasetShape) -> tuple[str, str]:
    """The dataset family whose training defaults fit a dataset of unknown name, and why."""
    if shape.long_dialogues:
        return "iemocap", f"long dialogues ({shape.mean_turns:.1f} turns on average): IEMOCAP's training defaults"
    return "meld", (
        f"short conversations ({shape.mean_turns:.1f} turns, {shape.mean_speakers:.1f} speakers on average): "
        "the defaults measured on MELD"
    )
