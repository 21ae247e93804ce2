"""Fine-tuning a transformer text encoder on conversations: context windows, the classifier, training.

Each utterance is encoded as a *pair*: segment A is the target turn (``"Speaker: text"``), segment B
its context window: the next turns (only where the whole conversation is known) and the previous
turns, nearest first, so that truncation (``only_second``, from the right) drops the farthest past
first. Labels never enter the input. The pooled vector is the mean over segment A's tokens (the
target), or the first token (``cls``); it is the feature the fusion models read, and a linear head on
it is the encoder's own classifier.

Parameter-efficient: LoRA adapters (``peft``) over the frozen base weights by default, so a bundle
carries a few MB, not a copy of the encoder. ``adapter="full"`` trains every weight instead (and
saves the whole encoder).

Pure PyTorch + transformers/peft: never imports ``service/``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.data import Conversation
from models.metrics import classification_metrics
from models.text_checkpoint import (
    Checkpointing,
    CheckpointWriter,
    TrainingStopped,
    TrainState,
    data_hash,
    load_trainable,
    model_fingerprint,
    trainable_state,
)

__all__ = [
    "ContextWindow",
    "FineTuneConfig",
    "TextClassifier",
    "conversation_inputs",
    "conversation_pairs",
    "conversation_turns",
    "finetune_text_encoder",
    "window_pairs",
]

POOLINGS = ("target-mean", "cls")


@dataclass(frozen=True)
class ContextWindow:
    """Which turns surround the target in the encoder input.

    Defaults: two past turns, no future. Past-only windows make the input of an utterance the same
    whether the conversation came whole (a batch job) or turn by turn (a chat, where later turns do
    not exist yet): no train/serve skew, and an appended turn never changes earlier features. Two
    turns keep a MELD input near 45 tokens (CPU cost grows with tokens); docs/results.md has the
    window ablation on dev.

    Attributes:
        past: previous turns (nearest first in the input).
        future: following turns; used only when the whole conversation is known (``future_known``).
        speaker: prefix every turn with ``"Speaker: "``.
        max_length: token limit of the pair (the context is truncated first).
        mode: ``"pairs"`` (one input per utterance, above) or ``"conversation"``
            (models.text_chunks: each turn encoded once, in chunks under a turn-causal mask; ``past``
            is then the turns carried before each chunk, ``future`` must be 0).
        chunk: output turns per chunk (conversation mode).
        turn_tokens: token limit of one turn (conversation mode).
        windowed: conversation mode: a token attends to its own turn and the ``past`` turns before it
            only (the view the pair encoder gives its target), not to every earlier turn of its chunk.
    """

    past: int = 2
    future: int = 0
    speaker: bool = True
    max_length: int = 96
    mode: str = "pairs"
    chunk: int = 4
    turn_tokens: int = 48
    windowed: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("pairs", "conversation"):
            raise ValueError(f"context mode must be 'pairs' or 'conversation', got {self.mode!r}")
        if self.mode == "conversation" and (self.future or self.chunk < 1 or self.turn_tokens < 1):
            raise ValueError("conversation mode needs future 0, chunk >= 1 and turn_tokens >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.mode == "pairs":  # entries written before the conversation mode stay byte-identical
            for k in ("mode", "chunk", "turn_tokens"):
                d.pop(k)
        if not self.windowed:  # entries written before the option stay byte-identical
            d.pop("windowed")
        return d

    @property
    def reach(self) -> int | None:
        """The attention window in turns of the conversation mode (models.text_chunks.turn_mask), or None."""
        return self.past if self.windowed else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextWindow:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _turn(speaker: str | None, text: str, with_speaker: bool) -> str:
    return f"{speaker}: {text}" if with_speaker and speaker else text


def _turns(speakers: Sequence[str | None], texts: Sequence[str | None], window: ContextWindow) -> list[str | None]:
    """Each turn's encoder string (``"Speaker: text"``), None where it has no text."""
    return [
        _turn(s, t.strip(), window.speaker) if isinstance(t, str) and t.strip() else None
        for s, t in zip(speakers, texts, strict=True)
    ]


def window_pairs(
    speakers: Sequence[str | None],
    texts: Sequence[str | None],
    window: ContextWindow,
    future_known: bool = True,
    first: int = 0,
) -> list[tuple[str, str] | None]:
    """Encoder inputs of one conversation: per utterance ``(target, context)`` or None (no text).

    Args:
        speakers, texts: the conversation's turns in order (``n`` each); absent texts are skipped as
            targets and as context.
        window: sizes and speaker prefix.
        future_known: False (a live chat: later turns may come) forbids future turns whatever ``window`` says.
        first: utterances before ``first`` get None (they serve only as context, e.g. an append).

    Returns:
        ``n`` entries; ``context`` is ``"next: ... || before: ..."`` (either part may be missing, or "").
    """
    turns = _turns(speakers, texts, window)
    present = [i for i, t in enumerate(turns) if t is not None]
    pos = {i: k for k, i in enumerate(present)}
    n_future = window.future if future_known else 0
    out: list[tuple[str, str] | None] = []
    for i, target in enumerate(turns):
        if target is None or i < first:
            out.append(None)
            continue
        k = pos[i]
        before = [turns[j] for j in reversed(present[max(0, k - window.past) : k])] if window.past else []
        after = [turns[j] for j in present[k + 1 : k + 1 + n_future]]
        parts = []
        if after:
            parts.append("next: " + " | ".join(after))  # type: ignore[arg-type]
        if before:
            parts.append("before: " + " | ".join(before))  # type: ignore[arg-type]
        out.append((target, " || ".join(parts)))  # type: ignore[arg-type]
    return out


def conversation_pairs(
    convs: Sequence[Conversation], window: ContextWindow, future_known: bool = True
) -> list[list[tuple[str, str] | None]]:
    """:func:`window_pairs` of every conversation."""
    return [
        window_pairs([u.speaker for u in c.utterances], [u.text for u in c.utterances], window, future_known)
        for c in convs
    ]


def conversation_turns(convs: Sequence[Conversation], window: ContextWindow) -> list[list[str | None]]:
    """Conversation mode's inputs: per conversation, each turn's ``"Speaker: text"`` or None (no text)."""
    return [_turns([u.speaker for u in c.utterances], [u.text for u in c.utterances], window) for c in convs]


def conversation_inputs(convs: Sequence[Conversation], window: ContextWindow) -> list[list[Any]]:
    """What :func:`finetune_text_encoder` reads per conversation in ``window.mode``."""
    if window.mode == "conversation":
        return conversation_turns(convs, window)
    return conversation_pairs(convs, window)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the model


class TextClassifier(nn.Module):
    """Encoder (optionally with LoRA adapters) + pooling + dropout + linear head.

    ``forward(batch)`` takes a tokenized batch (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``, and ``target_mask`` (B, T) marking segment A) and returns
    ``(pooled (B, H), logits (B, C))``.
    """

    def __init__(self, encoder: nn.Module, hidden: int, n_classes: int, pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)

    def pool(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled target vectors (B, H) in float32."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.pool_hidden(self.encoder(**inputs).last_hidden_state.float(), batch)

    def pool_hidden(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled target vectors (B, H) of the last hidden states ``hidden`` (B, T, H) of ``batch``."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["target_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(batch)
        return pooled, self.head(self.dropout(pooled))

    def forward_chunks(
        self, batch: dict[str, torch.Tensor], chunks: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conversation mode (models.text_chunks): ``batch`` from ``pad_chunks(chunks)``, ``attention_mask``
        (B, L, L); returns ``(pooled (N, H), logits (N, C))`` over the chunks' outputs in order."""
        from models.text_chunks import pool_chunks

        allowed = self.chunk_mask(batch["attention_mask"])
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=allowed).last_hidden_state
        pooled = pool_chunks(hidden.float(), batch, chunks)
        return pooled, self.head(self.dropout(pooled))

    def chunk_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's prepared mask (B, 1, L, L) of a turn mask (B, L, L): bool, or additive for eager attention."""
        allowed = attention_mask.bool()[:, None]  # a prepared mask, used as given
        config = getattr(self.encoder, "config", None)
        if getattr(config, "_attn_implementation", "eager") == "eager":  # eager adds the mask to the scores
            blocked = torch.finfo(torch.float32).min
            allowed = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, blocked)
        return allowed


def tokenize_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize ``(target, context)`` pairs; adds ``target_mask`` (B, T): 1 on segment A's real tokens."""
    firsts = [p[0] for p in pairs]
    seconds = [p[1] if p[1] else None for p in pairs]
    if all(s is None for s in seconds):
        enc = tokenizer(firsts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        seconds = [s or "" for s in seconds]
        enc = tokenizer(
            firsts, seconds, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt"
        )
    target = [[int(s == 0) for s in enc.sequence_ids(b)] for b in range(len(pairs))]
    batch = dict(enc)
    batch["target_mask"] = torch.tensor(target, dtype=enc["input_ids"].dtype)
    return batch


def tokenize_all(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Each pair tokenized once, unpadded (the same ids as :func:`tokenize_pairs` gives the whole list).

    Returns one dict per pair: ``input_ids``, ``attention_mask``, ``target_mask`` (and
    ``token_type_ids`` where the tokenizer makes them), lists of equal length T_i."""
    firsts = [p[0] for p in pairs]
    if all(not p[1] for p in pairs):
        enc = tokenizer(firsts, truncation=True, max_length=max_length)
    else:
        seconds = [p[1] or "" for p in pairs]
        enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out = []
    for b in range(len(pairs)):
        item = {k: enc[k][b] for k in keys}
        item["target_mask"] = [int(s == 0) for s in enc.sequence_ids(b)]
        out.append(item)
    return out


def pad_batch(items: Sequence[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad :func:`tokenize_all` items to the longest: (B, T) int64 tensors (ids padded with ``pad_id``)."""
    width = max(len(it["input_ids"]) for it in items)
    batch = {}
    for k in items[0]:
        arr = np.full((len(items), width), pad_id if k == "input_ids" else 0, np.int64)
        for b, it in enumerate(items):
            row = it[k]
            if left:
                arr[b, width - len(row) :] = row
            else:
                arr[b, : len(row)] = row
        batch[k] = torch.from_numpy(arr)
    return batch


# ------------------------------------------------------------------------------------------ training


@dataclass
class FineTuneConfig:
    """Hyperparameters of one fine-tune (recorded in the bundle's manifest).

    Defaults follow the recipes in the issue: lr 5e-5 full / 5e-4 LoRA for the encoder, 1e-3 head,
    batch 16, early stopping on dev weighted F1.
    """

    window: ContextWindow = field(default_factory=ContextWindow)
    pooling: str = "target-mean"
    adapter: str = "lora"  # "lora" | "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_layers: int | None = None  # adapters on the top N layers only (None = all): cheaper backward on CPU
    cache_lower: bool = False  # with lora_layers: the frozen lower layers run once, cached (models.text_cached)
    cache_alignments: int = 2  # conversation mode with cache_lower: chunk alignments cached (drawn per epoch)
    init: str | None = None  # warm start: an extractor folder (save_adapter) whose LoRA adapter and head start training
    distill: str | None = None  # teacher extractor folder: also match its vectors; select on the dev distance to them
    distill_weight: float = 1.0  # weight of the vector-matching loss (standardised squared error) beside cross-entropy
    lr: float = 5e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 16
    grad_accum: int = 1
    warmup: float = 0.06
    patience: int = 2
    evals_per_epoch: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    seed: int = 0
    amp: bool = True  # autocast on CUDA only

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = self.window.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FineTuneConfig:
        data = dict(data)
        data["window"] = ContextWindow.from_dict(data.get("window", {}))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


LORA_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}


def lora_targets(encoder: nn.Module) -> list[str]:
    """Names of the linear layers LoRA wraps: attention projections and the feed-forward layers."""
    kind = getattr(getattr(encoder, "config", None), "model_type", "bert")
    if kind in LORA_TARGETS:
        return LORA_TARGETS[kind]
    return sorted({n.split(".")[-1] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)})


def wrap_encoder(encoder: nn.Module, cfg: FineTuneConfig) -> nn.Module:
    """The encoder to train: LoRA-wrapped (base frozen) or itself (full fine-tune)."""
    if cfg.adapter == "full":
        return encoder
    if cfg.adapter != "lora":
        raise ValueError(f"adapter must be 'lora' or 'full', got {cfg.adapter!r}")
    from peft import LoraConfig, get_peft_model

    n_layers = int(getattr(encoder.config, "num_hidden_layers", 0) or 0)
    layers = None
    if cfg.lora_layers is not None and n_layers:
        layers = list(range(max(0, n_layers - cfg.lora_layers), n_layers))
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(encoder),
        layers_to_transform=layers,
    )
    return get_peft_model(encoder, lora)


def _initial_model(encoder: nn.Module, hidden: int, n_classes: int, cfg: FineTuneConfig) -> TextClassifier:
    """The classifier training starts from: fresh LoRA adapters and head, or ``cfg.init``'s (warm start;
    e.g. a pair-mode extractor continued in conversation mode)."""
    if cfg.init is None:
        return TextClassifier(wrap_encoder(encoder, cfg), hidden, n_classes, cfg.pooling)
    from peft import PeftModel
    from safetensors.torch import load_file

    init = Path(cfg.init)
    meta = json.loads((init / "finetune.json").read_text())
    if meta["config"].get("adapter", "lora") != "lora" or cfg.adapter != "lora" or int(meta["classes"]) != n_classes:
        raise ValueError(f"--init {init}: needs a LoRA extractor with {n_classes} classes")
    wrapped = PeftModel.from_pretrained(encoder, str(init / "adapter"), is_trainable=True)
    model = TextClassifier(wrapped, hidden, n_classes, cfg.pooling)
    model.head.load_state_dict(load_file(str(init / "head.safetensors")))
    return model


def _batches(n: int, lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed, shuffled batches of indices (little padding, random order)."""
    order = list(range(n))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        part = sorted(order[s : s + chunk], key=lambda i: lengths[i])
        batches.extend(part[k : k + batch_size] for k in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def _length_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, max_padding: float | None
) -> list[list[int]]:
    """Consecutive runs of ``order`` (sorted by length): at most ``batch_size``, and where
    ``max_padding`` is set, no longer than ``1 + max_padding`` times the run's first length."""
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if (
            current is None
            or len(current) >= batch_size
            or (max_padding is not None and lengths[i] > (1 + max_padding) * lengths[current[0]])
        ):
            batches.append([i])
        else:
            current.append(i)
    return batches


@torch.no_grad()
def predict_pairs(
    model: TextClassifier,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    device: str,
    batch_size: int = 64,
    amp: bool = False,
    max_padding: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled (N, H) float32, probabilities (N, C) float32)`` for ``pairs``, in order.

    Every pair is tokenized once; batches are formed in order of token length (little padding).
    Whether pairs without context are encoded as single segments is decided over the whole call.
    ``max_padding`` (e.g. 0.25): a batch also ends before a pair longer than ``1 + max_padding``
    times its shortest, which spends fewer padded tokens on CPU for one more forward call."""
    if model.training:  # eval() walks every submodule: ~1.5 ms a call on a served model
        model.eval()
    items = tokenize_all(tokenizer, pairs, max_length)
    lengths = [len(it["input_ids"]) for it in items]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    pooled = np.zeros((len(pairs), model.head.in_features), np.float32)
    probs = np.zeros((len(pairs), model.head.out_features), np.float32)
    pad_id = tokenizer.pad_token_id or 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for idx in _length_batches(order, lengths, batch_size, max_padding):
        batch = {k: v.to(device) for k, v in pad_batch([items[i] for i in idx], pad_id, left).items()}
        with torch.autocast("cuda", enabled=amp and device.startswith("cuda")):
            vec, logits = model(batch)
        pooled[idx] = vec.float().cpu().numpy()
        probs[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
    return pooled, probs


def _flatten(
    pairs: Sequence[Sequence[tuple[str, str] | None]], labels: Sequence[Sequence[int]] | None
) -> tuple[list[tuple[str, str]], list[int]]:
    flat, ys = [], []
    for c, conv in enumerate(pairs):
        for u, p in enumerate(conv):
            if p is not None and (labels is None or labels[c][u] >= 0):
                flat.append(p)
                ys.append(labels[c][u] if labels is not None else -1)
    return flat, ys


Forward = Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor]]
Batch = tuple[Forward, list[int], "np.ndarray | None"]  # forward -> (pooled (B, H), logits (B, C)), labels, targets


class _PairTask:
    """Training batches and dev predictions of the pair encoding (one input per utterance)."""

    def __init__(self, tokenizer: Any, train: Any, dev: Any, cfg: FineTuneConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.x_train, self.y_train = _flatten(*train)
        self.x_dev, self.y_dev = _flatten(*dev)
        self.lengths = [len(a) + len(b) for a, b in self.x_train]
        self.n_batches = math.ceil(len(self.x_train) / cfg.batch_size)

    dev_targets: np.ndarray | None = None  # no distillation in pair mode

    def epoch(self, rng: random.Random) -> list[Batch]:
        """``(forward(model, device) -> (pooled, logits), labels, None)`` per batch, shuffled."""

        def run(idx: list[int]) -> Forward:
            def forward(model: nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
                batch = tokenize_pairs(self.tokenizer, [self.x_train[i] for i in idx], self.cfg.window.max_length)
                return model({k: v.to(device) for k, v in batch.items()})

            return forward

        batches = _batches(len(self.x_train), self.lengths, self.cfg.batch_size, rng)
        return [(run(idx), [self.y_train[i] for i in idx], None) for idx in batches]

    def dev_predict(self, model: TextClassifier, device: str, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dev labels (N,), probabilities (N, C) and pooled vectors (N, H)."""
        pooled, probs = predict_pairs(model, self.tokenizer, self.x_dev, self.cfg.window.max_length, device, amp=amp)
        return np.array(self.y_dev), probs, pooled


class _ChunkTask:
    """Training batches and dev predictions of the conversation mode (models.text_chunks).

    A batch holds ``batch_size // chunk`` chunks (about ``batch_size`` labelled turns), length-bucketed;
    every epoch draws a new chunk alignment per conversation. ``targets`` (train, dev): per conversation
    the teacher's vectors (n_turns with text, H) to distil, or None."""

    def __init__(self, tokenizer: Any, train: Any, dev: Any, cfg: FineTuneConfig, targets: Any = None) -> None:
        from models.text_chunks import tokenize_turns

        self.cfg, self.pad_id = cfg, tokenizer.pad_token_id or 0
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        w = cfg.window

        def prepare(turns: Any, labels: Any) -> tuple[list[list[list[int]]], list[list[int]]]:
            toks, ys = [], []
            for conv, lab in zip(turns, labels, strict=True):
                keep = [i for i, t in enumerate(conv) if t is not None]
                toks.append(tokenize_turns(tokenizer, [conv[i] for i in keep], w.turn_tokens))
                ys.append([lab[i] for i in keep])
            return toks, ys

        self.train, self.dev = prepare(*train), prepare(*dev)
        self.t_train, self.t_dev = targets if targets is not None else (None, None)
        for name, data, tg in (("train", self.train, self.t_train), ("dev", self.dev, self.t_dev)):
            if tg is not None and [len(t) for t in data[0]] != [len(t) for t in tg]:
                raise ValueError(f"distillation: the teacher's {name} vectors do not match the turns with text")
        self.scale = torch.ones(1)  # 1 / the teacher's per-dimension std over train (H,)
        self.dev_targets: np.ndarray | None = None
        if self.t_train is not None:
            flat = np.concatenate([t for t in self.t_train if len(t)])
            std = flat.std(0)  # floored as the fusion models' input statistics are (common.set_input_stats)
            self.scale = torch.from_numpy(1.0 / np.where(std > 1e-4, std, 1.0)).float()
            self.dev_targets = np.concatenate(self._chunks(self.dev, None, self.t_dev)[2])
        self.per_batch = max(1, cfg.batch_size // w.chunk)
        self.n_batches = math.ceil(len(self._chunks(self.train, random.Random(0))[0]) / self.per_batch)

    def _chunks(
        self, data: Any, rng: random.Random | None, targets: Sequence[np.ndarray] | None = None
    ) -> tuple[list[Any], list[list[int]], list[np.ndarray]]:
        """Chunks, their outputs' labels, and (with ``targets``) their outputs' teacher vectors (k, H)."""
        from models.text_chunks import training_chunks

        w = self.cfg.window
        chunks, ys, rows = [], [], []
        for c, (toks, lab) in enumerate(zip(*data, strict=True)):  # one call per conversation: same rng draws
            part, y = training_chunks([toks], [lab], self.cls_id, self.sep_id, w.past, w.chunk, rng)
            chunks += part
            ys += y
            if targets is not None:
                rows += [targets[c][[i for i, _ in ch.outputs]] for ch in part]
        return chunks, ys, rows

    def epoch(self, rng: random.Random) -> list[Batch]:
        from models.text_chunks import pad_chunks

        chunks, ys, rows = self._chunks(self.train, rng, self.t_train)

        def run(part: list[Any]) -> Forward:
            def forward(model: nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
                batch = {k: v.to(device) for k, v in pad_chunks(part, self.pad_id, self.cfg.window.reach).items()}
                return model.forward_chunks(batch, part)

            return forward

        lengths = [len(c.input_ids) for c in chunks]
        batches = _batches(len(chunks), lengths, self.per_batch, rng)
        return [
            (
                run([chunks[i] for i in idx]),
                [y for i in idx for y in ys[i]],
                np.concatenate([rows[i] for i in idx]) if rows else None,
            )
            for idx in batches
        ]

    def dev_predict(self, model: TextClassifier, device: str, amp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from models.text_chunks import predict_chunks

        chunks, ys, _ = self._chunks(self.dev, None)
        pooled, probs = predict_chunks(model, self.pad_id, chunks, device, amp=amp, window=self.cfg.window.reach)
        return np.array([y for row in ys for y in row]), np.concatenate(probs), np.concatenate(pooled)

    def distance(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error in the teacher's standardised units (what a fusion model normalising its
        inputs with train statistics sees): (N, H), (N, H) -> scalar."""
        return (((pooled - targets) * self.scale.to(pooled.device)) ** 2).mean()


class _Trainer:
    """The optimiser, schedule, loss scaler and :class:`models.text_checkpoint.TrainState` of one fine-tune."""

    def __init__(
        self,
        model: TextClassifier,
        task: Any,
        cfg: FineTuneConfig,
        labels: Sequence[str],
        device: str,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.model, self.task, self.cfg, self.labels, self.device = model, task, cfg, labels, device
        self.progress = progress
        steps_per_epoch = math.ceil(task.n_batches / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        total = total if cfg.max_steps is None else min(cfg.max_steps, total)
        enc_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        self.optim = torch.optim.AdamW(
            [{"params": enc_params, "lr": cfg.lr}, {"params": model.head.parameters(), "lr": cfg.head_lr}],
            weight_decay=cfg.weight_decay,
        )
        warm = max(1, int(cfg.warmup * total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.optim, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / max(1, total - warm))
        )
        self.use_amp = cfg.amp and device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.loss_fn = nn.CrossEntropyLoss()
        self.state = TrainState()
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far, earlier processes of a resumed run included."""
        return self.state.elapsed + time.perf_counter() - self.started

    def train_batch(
        self, forward: Forward, ys: list[int], teacher: np.ndarray | None, last: bool
    ) -> tuple[float, bool]:
        """Forward and backward of one batch, an optimiser step where an accumulation ends (or ``last``):
        ``(loss, stepped)``."""
        cfg, device = self.cfg, self.device
        target = torch.tensor(ys, device=device)
        with torch.autocast("cuda", enabled=self.use_amp):
            pooled, logits = forward(self.model, device)
            loss = self.loss_fn(logits.float(), target)
            if teacher is not None:
                match = self.task.distance(pooled.float(), torch.from_numpy(teacher).to(device))
                loss = loss + cfg.distill_weight * match
            loss = loss / cfg.grad_accum
        self.scaler.scale(loss).backward()
        self.state.next_batch += 1
        if self.state.next_batch % cfg.grad_accum and not last:
            return loss.item() * cfg.grad_accum, False
        self.scaler.unscale_(self.optim)
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optim)
        self.scaler.update()
        self.optim.zero_grad(set_to_none=True)
        self.sched.step()
        self.state.step += 1
        return loss.item() * cfg.grad_accum, True

    def evaluate(self) -> bool:
        """A dev evaluation: appended to the history, the best trainable state kept; True: patience is out."""
        st, task = self.state, self.task
        y_dev, probs, vectors = task.dev_predict(self.model, self.device, self.use_amp)
        m = classification_metrics(y_dev, probs.argmax(1), self.labels)
        rec = {
            "epoch": st.epoch + 1,
            "step": st.step,
            "dev_weighted_f1": m["weighted_f1"],
            "dev_accuracy": m["accuracy"],
            "seconds": round(self.seconds(), 1),
        }
        score = m["weighted_f1"]
        if task.dev_targets is not None:
            error = task.distance(torch.from_numpy(vectors), torch.from_numpy(task.dev_targets))
            rec["dev_distill_mse"] = round(float(error), 5)
            score = -rec["dev_distill_mse"]
        rec["dev_selection"] = score
        st.history.append(rec)
        if self.progress:
            self.progress(json.dumps(rec))
        if score > st.best:
            st.best, st.bad, st.best_state = score, 0, trainable_state(self.model)
        else:
            st.bad += 1
        self.model.train()
        return st.bad >= self.cfg.patience

    def run_epoch(self, rng: random.Random, show_bar: bool, saver: _Saver | None) -> None:
        """Train the epoch ``state.epoch`` from ``state.next_batch`` (its batches recomputed from
        ``state.epoch_rng``); ends the epoch or sets ``state.finished``."""
        from tqdm import tqdm

        st, cfg = self.state, self.cfg
        rng.setstate(st.epoch_rng)
        batches = self.task.epoch(rng)
        eval_every = max(1, math.ceil(len(batches) / cfg.evals_per_epoch))
        self.model.train()
        bar = tqdm(
            total=len(batches),
            initial=st.next_batch,
            desc=f"finetune epoch {st.epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not show_bar,
        )
        while st.next_batch < len(batches):
            forward, ys, teacher = batches[st.next_batch]
            loss, stepped = self.train_batch(forward, ys, teacher, last=st.next_batch + 1 == len(batches))
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            b = st.next_batch
            done = cfg.max_steps is not None and st.step >= cfg.max_steps
            evaluated = b % eval_every == 0 or b == len(batches) or done
            if evaluated:
                st.finished = self.evaluate() or done
            ended = b == len(batches)
            if ended:  # the next epoch starts from the rng state this one left
                st.epoch, st.next_batch, st.epoch_rng = st.epoch + 1, 0, rng.getstate()
            if saver is not None and stepped and not st.finished:  # fit() writes the finished state
                saver.after_step(self, evaluated)
            if st.finished or ended:
                break
        bar.close()

    def fit(self, rng: random.Random, show_bar: bool, saver: _Saver | None) -> None:
        """Train until the epochs, the steps or the patience run out (or ``saver`` stops the run)."""
        st = self.state
        while st.epoch < self.cfg.epochs and not st.finished:
            self.run_epoch(rng, show_bar, saver)
        st.finished = True
        if saver is not None:
            saver.write(self)


class _Saver:
    """When to write checkpoints (:class:`models.text_checkpoint.Checkpointing`) and when to stop."""

    def __init__(self, writer: CheckpointWriter, policy: Checkpointing) -> None:
        self.writer, self.policy = writer, policy
        self.last = time.perf_counter()
        self.started = self.last
        self.due = False

    def write(self, trainer: _Trainer) -> None:
        self.writer.save(
            trainer.state,
            trainer.seconds(),
            trainer.model,
            trainer.optim,
            trainer.sched,
            trainer.scaler,
            trainer.device,
        )
        self.last, self.due = time.perf_counter(), False

    def after_step(self, trainer: _Trainer, evaluated: bool) -> None:
        """At an optimiser-step boundary: write if due (time, an evaluation since the last write); stop the
        run (:class:`models.text_checkpoint.TrainingStopped`) once ``stop_after`` / ``stop_at_step`` is reached."""
        st, policy, now = trainer.state, self.policy, time.perf_counter()
        self.due |= evaluated
        stop = (policy.stop_after is not None and now - self.started >= policy.stop_after) or (
            policy.stop_at_step is not None and st.step >= policy.stop_at_step
        )
        if self.due or stop or now - self.last >= policy.every:
            self.write(trainer)
        if stop:
            raise TrainingStopped(self.writer.directory, st.epoch, st.next_batch, st.step)


def finetune_text_encoder(
    encoder: nn.Module,
    tokenizer: Any,
    hidden: int,
    train: tuple[Sequence[Sequence[Any]], Sequence[Sequence[int]]],
    dev: tuple[Sequence[Sequence[Any]], Sequence[Sequence[int]]],
    labels: Sequence[str],
    cfg: FineTuneConfig,
    device: str = "cpu",
    progress: Callable[[str], None] | None = print,
    show_bar: bool = True,
    targets: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    checkpoint: Checkpointing | None = None,
) -> tuple[TextClassifier, list[dict[str, Any]]]:
    """Fine-tune ``encoder`` + a linear head for utterance classification; keep the best dev state.

    ``train`` / ``dev`` are (inputs per conversation, label index per utterance (-1 = unlabelled)); the
    inputs are :func:`window_pairs` entries in pair mode, the turn strings (:func:`conversation_turns`)
    in conversation mode. Selection: dev weighted F1, evaluated ``evals_per_epoch`` times per epoch;
    early stop after ``patience`` evaluations without improvement. Returns the model in its best state
    (eval mode) and the history (one dict per evaluation).

    Distillation (``cfg.distill`` and ``targets``: per train / dev conversation, the teacher's vectors of
    its turns with text, (n, H)), conversation mode only: the loss adds ``cfg.distill_weight`` x the
    squared error between the pooled vectors and the teacher's, per dimension over the teacher's train
    std, and selection is on that dev error instead (the student is meant to stand in for the teacher
    under a fusion model trained on the teacher's vectors: the accuracy that matters is the fusion's).

    ``checkpoint`` (a :class:`models.text_checkpoint.Checkpointing`): write resumable checkpoints, or
    continue one; a resumed run ends with the weights and history of an uninterrupted one (the
    history's ``seconds`` aside). Raises :class:`models.text_checkpoint.TrainingStopped` when it asks
    the run to stop early.
    """
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    model = _initial_model(encoder, hidden, len(labels), cfg)
    if (cfg.distill is None) != (targets is None):
        raise ValueError("distillation needs both cfg.distill (the teacher) and its vectors (targets)")
    if targets is not None and cfg.window.mode != "conversation":
        raise ValueError("distillation is implemented for conversation mode (a pair-mode student is the teacher)")
    saver = None
    if checkpoint is not None:
        identity = {
            "config": cfg.to_dict(),
            "labels": list(labels),
            "hidden": hidden,
            "model": model_fingerprint(model),
            "data": data_hash(train, dev, targets),
        }
        saver = _Saver(CheckpointWriter(checkpoint, identity, progress), checkpoint)
    if cfg.cache_lower:  # the frozen lower layers' states computed once (models.text_cached)
        from models.text_cached import cached_task

        keep = checkpoint.directory / "lower-cache" if checkpoint is not None else None  # reused on resume
        task: _ChunkTask | _PairTask = cached_task(model, tokenizer, train, dev, cfg, targets, device, progress, keep)
    elif cfg.window.mode == "conversation":
        task = _ChunkTask(tokenizer, train, dev, cfg, targets)
    else:
        task = _PairTask(tokenizer, train, dev, cfg)
    trainer = _Trainer(model.to(device), task, cfg, labels, device, progress)
    trainer.state.epoch_rng = rng.getstate()
    if saver is not None and checkpoint.resume:
        trainer.state = saver.writer.restore(model, trainer.optim, trainer.sched, trainer.scaler, device)
    trainer.fit(rng, show_bar, saver)
    if cfg.cache_lower:  # the run has ended: its cached states' files go
        task.release()  # type: ignore[union-attr]
    if trainer.state.best_state is not None:
        load_trainable(model, trainer.state.best_state)
    return model.eval(), trainer.state.history


def save_adapter(model: TextClassifier, cfg: FineTuneConfig, out: str | Path, base: dict[str, Any]) -> Path:
    """Write the trained parts into ``out``: the adapter (or full encoder), the head and ``finetune.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.adapter == "lora":
        model.encoder.save_pretrained(str(out / "adapter"))
    else:
        model.encoder.save_pretrained(str(out / "encoder"))
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
    meta = {"base": base, "config": cfg.to_dict(), "hidden": model.head.in_features, "classes": model.head.out_features}
    (out / "finetune.json").write_text(json.dumps(meta, indent=2))
    return out


def load_classifier(encoder: nn.Module, directory: str | Path, merge: bool = True) -> TextClassifier:
    """The classifier saved by :func:`save_adapter` over ``encoder`` (the base model); LoRA merged for speed."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "finetune.json").read_text())
    cfg = FineTuneConfig.from_dict(meta["config"])
    if cfg.adapter == "lora":
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(encoder, str(directory / "adapter"))
        encoder = wrapped.merge_and_unload() if merge else wrapped
    model = TextClassifier(encoder, int(meta["hidden"]), int(meta["classes"]), cfg.pooling)
    model.head.load_state_dict(load_file(str(directory / "head.safetensors")))
    return model.eval()
