"""Shared vocabulary of the fusion models: the batch, the outputs, the base class.

Every architecture consumes a :class:`Batch` and returns a :class:`ModelOutput`.
Utterances are the sequence axis. Shapes use B = conversations in the batch,
N = utterances (padded), M = 3 modalities in :data:`MODALITIES` order, C = classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODALITIES: tuple[str, ...] = ("text", "audio", "visual")
IGNORE_INDEX = -100


def modality_index(name: str) -> int:
    """Column of ``name`` in a presence mask (B, N, M)."""
    return MODALITIES.index(name)


@dataclass
class Batch:
    """A padded batch of conversations.

    features: modality -> (B, N, D_m) float. Every modality the model was built with
        is present as a key; values where the modality is absent may be anything
        (models must use :meth:`modality`, which zeroes them).
    present: (B, N, M) bool, what the model may see (after missing-modality masking).
    mask: (B, N) bool, True for real utterances, False for padding.
    speakers: (B, N) long, per-conversation speaker index in [0, n_speakers).
    labels: (B, N) long, class index or IGNORE_INDEX (padding, unlabelled).
    available: (B, N, M) bool, presence before artificial masking (complete view
        used by teachers, e.g. ITEACH-Net). Defaults to ``present``.
    """

    features: dict[str, Tensor]
    present: Tensor
    mask: Tensor
    speakers: Tensor
    labels: Tensor | None = None
    available: Tensor | None = None

    def __post_init__(self) -> None:
        if self.available is None:
            self.available = self.present

    @property
    def size(self) -> tuple[int, int]:
        """(B, N)."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def modality(self, name: str, complete: bool = False) -> tuple[Tensor, Tensor]:
        """Features of one modality zeroed where absent, and its presence.

        Returns x (B, N, D_m) and present (B, N) bool (already and-ed with ``mask``).
        ``complete=True`` uses ``available`` (the un-masked view) instead of ``present``.
        """
        source = self.available if complete else self.present
        assert source is not None
        present = source[..., modality_index(name)] & self.mask
        x = self.features[name]
        return x * present.unsqueeze(-1).to(x.dtype), present

    def to(self, device: torch.device | str) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            features={k: v.to(device, non_blocking=True) for k, v in self.features.items()},
            present=self.present.to(device),
            mask=self.mask.to(device),
            speakers=self.speakers.to(device),
            labels=move(self.labels),
            available=move(self.available),
        )

    def with_present(self, present: Tensor) -> Batch:
        """Same batch with another presence mask (``available`` kept)."""
        return Batch(self.features, present, self.mask, self.speakers, self.labels, self.available)


@dataclass
class ModelOutput:
    """logits: (B, N, C) per-utterance class scores used for prediction.
    aux: whatever the model's losses need (branch logits, hidden states, ...)."""

    logits: Tensor
    aux: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    """total: scalar to back-propagate; parts: detached named terms for logging."""

    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class FusionConfig:
    """Fields every architecture's config has. Subclasses add the paper's defaults.

    input_dims: modality -> feature dimension; its keys are the modalities the model
        is built for (a subset of MODALITIES, e.g. {"text": 384} for text-only data).
    """

    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 384})
    n_classes: int = 7
    n_speakers: int = 9

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.input_dims)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**values)


class FusionModel(nn.Module):
    """Base class of the four architectures.

    Subclasses set ``config_class``, implement :meth:`forward` and :meth:`compute_loss`.
    Multi-stage training (SUMMER's frozen text teacher) lists its stages in ``stages``;
    the trainer calls :meth:`set_stage` before each, in order, and selects the best
    checkpoint of each stage on dev using ``forward(...).logits``.
    """

    config_class: ClassVar[type[FusionConfig]] = FusionConfig
    stages: ClassVar[tuple[str, ...]] = ("main",)

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        for m in config.input_dims:
            if m not in MODALITIES:
                raise ValueError(f"unknown modality {m!r}; expected one of {MODALITIES}")
        self.config = config
        self.stage = self.stages[-1]
        # Per-modality input standardisation (identity until set_input_stats), saved
        # with the weights so a bundle carries the statistics of its training data.
        for m, dim in config.input_dims.items():
            self.register_buffer(f"input_mean_{m}", torch.zeros(dim))
            self.register_buffer(f"input_std_{m}", torch.ones(dim))
        self.register_forward_pre_hook(_standardise_inputs)

    @torch.no_grad()
    def set_input_stats(self, stats: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Set mean and std (each (D_m,)) per modality; std is floored to avoid blow-ups."""
        for m, (mean, std) in stats.items():
            getattr(self, f"input_mean_{m}").copy_(mean)
            getattr(self, f"input_std_{m}").copy_(torch.where(std > 1e-4, std, torch.ones_like(std)))

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def set_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"{type(self).__name__} has no stage {stage!r}")
        self.stage = stage

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(
        self, out: ModelOutput, batch: Batch, class_weights: Tensor | None = None
    ) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-module learning rates."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


def _standardise_inputs(model: FusionModel, args: tuple) -> tuple:
    """Forward pre-hook: (x - mean) / std on every modality's features of the batch."""
    batch = args[0]
    feats = dict(batch.features)
    for m in model.config.input_dims:
        if m in feats:
            mean, std = getattr(model, f"input_mean_{m}"), getattr(model, f"input_std_{m}")
            feats[m] = (feats[m] - mean.to(feats[m].dtype)) / std.to(feats[m].dtype)
    return (Batch(feats, batch.present, batch.mask, batch.speakers, batch.labels, batch.available), *args[1:])


# ---------------------------------------------------------------------------
# Small helpers shared by several architectures.


def masked_ce(logits: Tensor, labels: Tensor, weight: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over valid utterances. logits (B, N, C), labels (B, N)."""
    c = logits.shape[-1]
    flat = labels.reshape(-1)
    if not bool((flat != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(
        logits.reshape(-1, c),
        flat,
        weight=weight,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def sinusoidal_positions(n: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed sinusoidal position encoding (n, dim) as in Vaswani et al."""
    position = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return pe


def key_padding_bias(valid: Tensor) -> Tensor:
    """Additive attention bias from a key validity mask.

    valid: (B, N) bool -> (B, 1, 1, N) float with 0 for valid keys and -inf otherwise.
    Rows whose keys are all invalid get 0 everywhere (uniform attention over zeros)
    instead of NaN; callers zero such rows' outputs with the query mask.
    """
    any_valid = valid.any(dim=-1, keepdim=True)
    ok = valid | ~any_valid
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    bias = bias.masked_fill(~ok, float("-inf"))
    return bias[:, None, None, :]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, E) -> (B, heads, N, E / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).flatten(2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, heads: int, dropout_p: float = 0.0) -> Tensor:
    """The one masked multi-head attention of the fusion models (SDT, DMD, ITEACH; SUMMER needs the raw
    scores for its teacher-guided damping and uses split_heads / key_padding_bias itself).

    q (B, Nq, E), k / v (B, Nk, E), already projected; bias additive, broadcastable to
    (B, heads, Nq, Nk) (e.g. :func:`key_padding_bias`). Returns the merged context (B, Nq, E). Uses
    ``scaled_dot_product_attention`` (fused kernels where the device has them).
    """
    ctx = F.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=bias.to(q.dtype),
        dropout_p=dropout_p,
    )  # fmt: skip
    return merge_heads(ctx)


def int8_linear(module: nn.Module, min_weights: int = 1 << 18) -> nn.Module:
    """A copy of ``module`` with its large ``nn.Linear`` layers dynamically quantized for CPU inference:
    int8 weights per output channel, activations quantized per call (torch.ao dynamic quantization).
    Small batches on CPU are bound by reading the weights, which this makes 4x smaller. Layers under
    ``min_weights`` weights (e.g. 512 x 512) stay float: there quantizing the activations costs more
    than it saves (DMD and ITEACH-Net, whose layers are small, ran 1.1-2.5x slower quantized whole,
    docs/benchmarks.md). Inference only.

    A module whose code reads a child Linear's ``weight`` itself (not through its forward) lists that
    child in a class attribute ``int8_skip``; those stay float."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    skip = {
        f"{name}.{child}".lstrip(".") for name, m in module.named_modules() for child in getattr(m, "int8_skip", ())
    }
    spec = {
        name: per_channel_dynamic_qconfig
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and name not in skip and m.weight.numel() >= min_weights
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, spec, dtype=torch.qint8)
