"""Resumable text fine-tuning (models.text_checkpoint): an interrupted, resumed run ends exactly where an
uninterrupted one does, in pair and conversation mode; a resume with other options is refused.

A tiny random BERT (2 layers, 32 wide) over a word-level vocabulary written here, so the test needs no
downloaded encoder and runs in seconds; LoRA and head dropout are on, so the RNG states matter.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from models.data import Conversation, Utterance
from models.text_checkpoint import Checkpointing, TrainingStopped, read_summary, trainable_state
from models.text_finetune import ContextWindow, FineTuneConfig, conversation_inputs, finetune_text_encoder

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LABELS = ["neutral", "joy", "anger"]
LINES = {
    "joy": ["i love this it is wonderful", "what a fantastic day i am so happy"],
    "anger": ["i hate this it is terrible", "get out you make me furious"],
    "neutral": ["the train leaves at noon", "the report is on the desk"],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, a randomly initialised 2-layer BERT) sharing a word-level vocabulary."""
    words = sorted({w for lines in LINES.values() for line in lines for w in line.split()} | {"ann", "bob"})
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + words + [":", "|", "before", "next"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))  # the fast one: sequence_ids
    assert len(tokenizer) == len(SPECIAL) + len(words) + 4
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(words) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return tokenizer, transformers.BertModel(config).eval()


def _conversations() -> list[Conversation]:
    convs = []
    for c in range(4):
        utts = []
        for i, label in enumerate(["joy", "neutral", "anger", "neutral", "joy", "anger"]):
            text = LINES[label][(c + i) % 2]
            utts.append(Utterance(id=f"c{c}u{i}", speaker=["Ann", "Bob"][i % 2], text=text, label=label))
        convs.append(Conversation(id=f"c{c}", utterances=utts))
    return convs


def _config(mode: str, **changes: Any) -> FineTuneConfig:
    window = ContextWindow(past=1, max_length=32, mode=mode, chunk=2, turn_tokens=12)
    values: dict[str, Any] = {
        "window": window,
        "lora_r": 4,
        "lr": 3e-3,
        "head_lr": 3e-2,
        "epochs": 3,
        "batch_size": 4,
        "grad_accum": 2 if mode == "pairs" else 1,
        "evals_per_epoch": 2,
        "patience": 100,
        "seed": 3,
    }
    return FineTuneConfig(**{**values, **changes})


def _fit(
    tiny, cfg: FineTuneConfig, checkpoint: Checkpointing | None = None, log: list[str] | None = None, device="cpu"
):
    tokenizer, base = tiny
    convs = _conversations()
    data = (conversation_inputs(convs, cfg.window), [[LABELS.index(u.label) for u in c.utterances] for c in convs])
    return finetune_text_encoder(
        copy.deepcopy(base),  # LoRA wraps the encoder in place: every run gets a fresh copy
        tokenizer,
        32,
        data,
        data,
        LABELS,
        cfg,
        device=device,
        progress=log.append if log is not None else None,
        show_bar=False,
        checkpoint=checkpoint,
    )


def _without_seconds(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


@pytest.mark.parametrize(
    ("mode", "device"), [("pairs", "cpu"), ("conversation", "cpu"), ("pairs", "cuda")], ids=["pairs", "conv", "cuda"]
)
def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(
    tiny, mode: str, device: str, tmp_path: Path
) -> None:
    """On CUDA the run is in mixed precision: the GradScaler state and the CUDA RNG travel too."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = _config(mode)
    reference, history = _fit(tiny, cfg, device=device)
    assert len(history) == 6
    where, log = tmp_path / "ckpt", []
    stops = [3, 7]  # mid-epoch (between evaluations), then later; the third run finishes, the fourth
    for stop in [*stops, None, None]:  # resumes the finished checkpoint: nothing left but the best state
        policy = Checkpointing(where, every=math.inf, resume=stop != stops[0], stop_at_step=stop)
        if stop is None:
            model, resumed = _fit(tiny, cfg, policy, log, device)
        else:
            with pytest.raises(TrainingStopped) as stopped:
                _fit(tiny, cfg, policy, log, device)
            assert stopped.value.step == stop and read_summary(where)["step"] == stop
    assert any(line.startswith("resume: epoch") for line in log), log
    assert any(line.startswith("checkpoint: epoch") for line in log), log
    assert _without_seconds(resumed) == _without_seconds(history)
    expected, got = trainable_state(reference), trainable_state(model)
    assert expected.keys() == got.keys() and any("lora_" in k for k in got)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    assert read_summary(where)["finished"] is True


def test_resume_with_other_options_or_over_a_checkpoint_is_refused(tiny, tmp_path: Path) -> None:
    cfg = _config("pairs")
    where = tmp_path / "ckpt"
    with pytest.raises(TrainingStopped):
        _fit(tiny, cfg, Checkpointing(where, every=0, stop_at_step=2))
    with pytest.raises(ValueError, match=r"different run \(lr 0.003 -> 0.001\)"):
        _fit(tiny, _config("pairs", lr=1e-3), Checkpointing(where, resume=True))
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _fit(tiny, cfg, Checkpointing(where))
    with pytest.raises(ValueError, match="no checkpoint there"):
        _fit(tiny, cfg, Checkpointing(tmp_path / "empty", resume=True))
