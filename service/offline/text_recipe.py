"""The one-command recipe: defaults chosen from the shape of a dataset nobody here has seen.

``merc train ARCH --data DIR --text-encoder finetune:BASE`` must do well on a new dataset without
flags. What the measurements here say (docs/results.md, "Long past context"): long dialogues (IEMOCAP:
~48 turns, two speakers) lean on their past (the encoder's own dev w-F1 falls from 58.6 to 44.0
without it) and are read best, of what was measured, by the pair input with three past turns: a
conversation-mode encoder reading eight past turns (each turn encoded once, windowed) reached only
~56 after four epochs. Short multi-party scenes (MELD: ~10 turns) gain little past two turns. So the
pair input stays, with its past window and epochs following the training conversations' length; the
choice is printed with its reason. Flags the user gives (``--set finetune.NAME=V``, ``--lr`` ...)
always win.

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

LONG_DIALOGUE_TURNS = 20  # mean turns per conversation from which a longer past window pays
LONG_PAST, LONG_MAX_LENGTH = 3, 96  # IEMOCAP's measured recipe (iemocap6-minilm-ctx)
SHORT_PAST, SHORT_MAX_LENGTH = 2, 80  # MELD's (meld7-minilm-ctx)


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


def text_recipe(shape: DatasetShape) -> tuple[dict[str, Any], str]:
    """Fine-tune defaults (FineTuneConfig field -> value; window fields flat) and why."""
    epochs = 4 if shape.utterances < 4000 else 3
    past, max_length = (LONG_PAST, LONG_MAX_LENGTH) if shape.long_dialogues else (SHORT_PAST, SHORT_MAX_LENGTH)
    window = dict(mode="pairs", past=past, max_length=max_length)
    sign = ">=" if shape.long_dialogues else "<"
    why = (
        f"conversations average {shape.mean_turns:.1f} turns ({sign} {LONG_DIALOGUE_TURNS}): pairs, the target "
        f"with its {past} previous turns in {max_length} tokens"
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
