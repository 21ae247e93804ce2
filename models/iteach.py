"""ITEACH-Net: inverted teacher-student search network for incomplete multimodal ERC.

Paper: "ITEACH-Net: Inverted Teacher-studEnt seArCH Network for Emotion Recognition in
Conversation" (reference/papers/004_*.txt; summary in reference/models.md). Shapes use
B conversations, N utterances (padded), d = ``hidden``, H = ``heads``, K candidate mixers.

Structure (one training stage, "main"; teacher and student are trained jointly):

* Teacher (``teacher_layers`` = 3 encoder layers, self-attention token mixer) reads the
  COMPLETE view ``batch.modality(m, complete=True)``; it runs in training mode only.
* Student (``student_layers`` = 4 encoder layers, input-dependent NAS token mixer) reads the
  MASKED view ``batch.modality(m)``. Its logits are the prediction.
* Each of the two is a :class:`Branch`: per-modality Linear(D_m -> d), per-modality ECCE
  attention bias, encoder layers, LayerNorm + Linear classifier on the anchor stream.
* Encoder layer: one Metaformer block per modality (x += mixer(LN x); x += FFN(LN x),
  FFN ratio 4 with GELU), then cross-attention merging the other modalities into the
  anchor (text): text is the query, audio then visual are keys/values (pre-LN, residual).
  The anchor stream after each layer is the hidden state H of that layer.
* Student mixer: a Router (Linear d -> K, softmax, per token) weighs the outputs of the
  AttentionMixer, MLPMixer, AvgPool(3) and MaxPool(3) mixers (``mixers`` field).
* ECCE per modality: z = Conv1d(window 7) over utterances; e_ij = mean(z[min(i,j)..max(i,j)])
  for |i - j| <= dist (30), else 0; a Linear maps e_ij to a scalar added to every attention
  map of that modality (all heads, every layer).
* Loss: CE(teacher, complete) + CE(student, masked) + 0.5|H'1-H1|^2 + 0.1|H'2-H2|^2
  + 0.05|H'3-H3|^2 (H1 = last layer), teacher hidden states detached.

Choices and deviations (the paper leaves these open or they are needed here):

* Positions and cross-modal alignment (not in the paper): fixed sinusoidal encodings are
  added to every modality after the input projection, and the cross-attention gets an
  ALiBi-style bias -slope_h |i - j| (Press et al., 2022) with per-head slopes
  2^(locality_top - locality_span * h / H), h = 0..H-1 (2, 1, ..., 1/64 at 8 heads), so
  some heads look at the same and nearby utterances, others at the whole conversation.
  Without them the text query cannot single out the same utterance among the audio and
  visual keys: a label carried by audio only was memorised, not learnt (held-out
  accuracy 0.41 without the locality bias, 0.97-1.0 with it, tiny model).
* Speakers are not used (the paper does not use them). ``n_speakers`` is ignored.
* ECCE: the conv runs on the projected d-dim features (not the raw D_m-dim ones, which
  would cost 7*D_m^2 parameters), with absent and padded utterances zeroed. The Linear is
  affine, so Linear(mean z) = mean(Linear z): the scalar w.z is projected first and its
  i..j means come from one cumulative sum: O(N d) projection and O(N^2) for the map. The Linear
  has no bias: Algorithm 1 maps far pairs to FC(0) = b and near pairs to w.e + b, which is
  our map plus the constant b for the whole row, and softmax ignores a row constant.
  Pairs with |i - j| <= dist are "near" (Algorithm 1's loop gives |i - j| < dist).
* Missing data: absent tokens are zero after projection (plus their position), are never
  attention keys (self or cross), and count as empty neighbours in the pooling and MLP
  mixers. Query rows with no valid key get a zero attention output (no NaN, no leak).
  Padded positions are re-zeroed after every block, so padding cannot change valid outputs.
* MLPMixer: the token-mixing MLP of MLP-Mixer along utterances, Linear(L, L) -> GELU ->
  Linear(L, L) shared over channels, with a fixed maximum length L = ``mlp_max_len``.
  A conversation with N <= L uses the first N rows/columns of the weights (the same as
  zero-padding to L); longer ones are cut into consecutive chunks of L utterances mixed
  independently (no mixing across chunk borders; the attention and pooling candidates
  still connect them). Absent and padded inputs are zeroed first.
* Pool mixers return the pooled value itself, as in the paper's appendix (PoolFormer's
  ``pool(x) - x`` is not used). AvgPool averages only present neighbours; MaxPool puts
  -inf at absent/padded neighbours; a window with none present gives 0.
* Distances: mean squared error over valid utterances and hidden units. If a model has
  fewer than three layers, the last min(teacher_layers, student_layers, 3) pairs are used.
* In eval mode the teacher is skipped and the loss is the student's CE only.
* Modalities: the anchor is text when the model is built with text, else the first of its
  modalities; with a single modality there is no cross-attention.
* Dropout (0.1, on projections, attention weights, mixer and FFN outputs) is not given
  in the paper. The router learning rate is ``router_lr_scale`` (10) times the base rate,
  the paper's 5e-3 for 5e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    Batch,
    FusionConfig,
    FusionModel,
    LossOutput,
    ModelOutput,
    key_padding_bias,
    masked_attention,
    masked_ce,
    sinusoidal_positions,
)
from models.registry import register_model

CANDIDATES: tuple[str, ...] = ("attention", "mlp", "avgpool", "maxpool")


@dataclass
class ITEACHConfig(FusionConfig):
    """Paper defaults (Sec. 4.4): hidden 128, 8 heads, FFN 4.0, window 7, dist 30,
    teacher 3 / student 4 layers, 4 candidate mixers, router lr 10x (5e-3 vs 5e-4).

    Our additions: ``mixers`` names the student's candidates (subset of CANDIDATES);
    ``pool_size`` the pool window; ``mlp_max_len`` the MLPMixer length L; ``dropout``
    (not in the paper); ``locality_top``/``locality_span`` the cross-attention slopes.
    """

    hidden: int = 128
    heads: int = 8
    ffn_ratio: float = 4.0
    window: int = 7
    dist: int = 30
    teacher_layers: int = 3
    student_layers: int = 4
    mixers: tuple[str, ...] = CANDIDATES
    pool_size: int = 3
    mlp_max_len: int = 128
    distance_weights: tuple[float, ...] = (0.5, 0.1, 0.05)
    dropout: float = 0.1
    router_lr_scale: float = 10.0
    locality_top: float = 1.0
    locality_span: float = 8.0


TINY: dict[str, Any] = {
    "hidden": 32,
    "heads": 4,
    "ffn_ratio": 2.0,
    "window": 3,
    "dist": 8,
    "teacher_layers": 1,
    "student_layers": 2,
    "mlp_max_len": 8,
    "dropout": 0.0,
}


# ---------------------------------------------------------------------------
# Attention and the ECCE bias.


def attention_bias(present: Tensor, ecce: Tensor | None = None) -> Tensor:
    """Additive bias (B, 1, Nq|1, Nk): -inf at absent keys (present (B, Nk) bool) plus
    the ECCE map (B, Nq, Nk) if given. Rows without any valid key are all-zero."""
    bias = key_padding_bias(present)
    return bias if ecce is None else bias + ecce[:, None]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with an additive bias.

    query (B, Nq, d), key (B, Nk, d), bias broadcastable to (B, H, Nq, Nk) -> (B, Nq, d).
    Outputs of query rows whose keys are all masked are zeroed (``has_keys`` (B,)).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden {dim} not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, bias: Tensor, has_keys: Tensor) -> Tensor:
        k, v = self.kv(key).chunk(2, -1)  # the kv layer's rows: keys first, then values
        p = self.dropout if self.training else 0.0
        o = self.out(masked_attention(self.q(query), k, v, bias, self.heads, p))
        return o * has_keys.to(o.dtype)[:, None, None]


class ECCE(nn.Module):
    """Emotion Context Changing Encoder of one modality.

    h (B, N, d) projected features, zero at absent/padded utterances -> (B, N, N) scalar
    bias: z = Conv1d_w(h); bias_ij = w . mean(z[lo..hi]) with lo = min(i,j), hi = max(i,j)
    if |i - j| <= dist, else 0. The means use a cumulative sum of the scalars w . z.
    """

    def __init__(self, dim: int, window: int, dist: int) -> None:
        super().__init__()
        if window % 2 == 0:
            raise ValueError(f"ECCE window must be odd, got {window}")
        self.dist = dist
        self.local = nn.Conv1d(dim, dim, window, padding=window // 2)
        self.fc = nn.Linear(dim, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        z = self.local(h.transpose(1, 2)).transpose(1, 2)
        s = self.fc(z).squeeze(-1)
        return range_means(s, self.dist)


def range_means(s: Tensor, dist: int) -> Tensor:
    """s (B, N) -> (B, N, N): mean of s[min(i,j)..max(i,j)] for |i-j| <= dist, else 0."""
    n = s.shape[-1]
    c = F.pad(s.cumsum(-1), (1, 0))
    idx = torch.arange(n, device=s.device)
    lo = torch.minimum(idx[:, None], idx[None, :])
    hi = torch.maximum(idx[:, None], idx[None, :])
    means = (c[:, hi + 1] - c[:, lo]) / (hi - lo + 1).to(s.dtype)
    return means * ((hi - lo) <= dist).to(s.dtype)


# ---------------------------------------------------------------------------
# Token mixers: (x (B, N, d) normalised, present (B, N) bool, ecce (B, N, N)) -> (B, N, d).


class AttentionMixer(nn.Module):
    """Self-attention over present utterances with the ECCE bias on the mix map."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, dropout)

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor | None) -> Tensor:
        return self.attn(x, x, attention_bias(present, ecce), present.any(-1))


class MLPMixer(nn.Module):
    """Token-mixing MLP along utterances, Linear(L, L) -> GELU -> Linear(L, L), L fixed.

    N <= L: the first N rows/columns of the weights are used (= zero-padding to L).
    N > L: consecutive chunks of L utterances are mixed independently (see module doc).
    Absent/padded inputs are zeroed; the ECCE bias is not used (no mix map).
    """

    int8_skip = ("fc1", "fc2")  # their weights are sliced in forward (models.common.int8_linear)

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.fc1 = nn.Linear(max_len, max_len)
        self.fc2 = nn.Linear(max_len, max_len)

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor | None) -> Tensor:
        b, n, d = x.shape
        length = min(n, self.max_len)
        chunks = math.ceil(n / length)
        x = x * present.unsqueeze(-1).to(x.dtype)
        x = F.pad(x, (0, 0, 0, chunks * length - n))
        t = x.view(b, chunks, length, d).transpose(2, 3)  # (B, chunks, d, length)
        t = F.gelu(F.linear(t, self.fc1.weight[:, :length], self.fc1.bias))
        t = F.linear(t, self.fc2.weight[:length], self.fc2.bias[:length])
        return t.transpose(2, 3).reshape(b, chunks * length, d)[:, :n]


class AvgPoolMixer(nn.Module):
    """Mean over the present utterances of a window of ``size`` (0 if none)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor | None) -> Tensor:
        w = present.unsqueeze(1).to(x.dtype)  # (B, 1, N)
        pool = dict(kernel_size=self.size, stride=1, padding=self.size // 2)
        num = F.avg_pool1d((x * w.transpose(1, 2)).transpose(1, 2), **pool)
        den = F.avg_pool1d(w, **pool)
        return (num / den.clamp_min(1e-6)).transpose(1, 2)


class MaxPoolMixer(nn.Module):
    """Max over the present utterances of a window of ``size`` (-inf elsewhere; 0 if none)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor | None) -> Tensor:
        neg = x.masked_fill(~present.unsqueeze(-1), float("-inf")).transpose(1, 2)
        out = F.max_pool1d(neg, self.size, stride=1, padding=self.size // 2).transpose(1, 2)
        return out.masked_fill(torch.isneginf(out), 0.0)


def make_mixer(name: str, config: ITEACHConfig) -> nn.Module:
    if name == "attention":
        return AttentionMixer(config.hidden, config.heads, config.dropout)
    if name == "mlp":
        return MLPMixer(config.mlp_max_len)
    if name == "avgpool":
        return AvgPoolMixer(config.pool_size)
    if name == "maxpool":
        return MaxPoolMixer(config.pool_size)
    raise ValueError(f"unknown ITEACH mixer {name!r}; choose from {CANDIDATES}")


class RoutedMixer(nn.Module):
    """Input-dependent search: weights = softmax(Router(x)) (B, N, K) per token,
    output = sum_k weights[..., k] * candidate_k(x). A single candidate needs no router."""

    def __init__(self, names: tuple[str, ...], config: ITEACHConfig) -> None:
        super().__init__()
        self.candidates = nn.ModuleList(make_mixer(n, config) for n in names)
        self.router = nn.Linear(config.hidden, len(names)) if len(names) > 1 else None

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.router is None:
            return self.candidates[0](x, present, ecce), None
        weights = self.router(x).softmax(-1)
        outs = torch.stack([c(x, present, ecce) for c in self.candidates], dim=-1)
        return (outs * weights.unsqueeze(2)).sum(-1), weights


# ---------------------------------------------------------------------------
# Encoder.


class MetaformerBlock(nn.Module):
    """x += mixer(LN x); x += FFN(LN x); padded positions re-zeroed. x (B, N, d)."""

    def __init__(self, mixers: tuple[str, ...], config: ITEACHConfig) -> None:
        super().__init__()
        d, hidden = config.hidden, int(config.hidden * config.ffn_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mixer = RoutedMixer(mixers, config)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, present: Tensor, ecce: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        mixed, weights = self.mixer(self.norm1(x), present, ecce)
        x = x + self.drop(mixed)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x * mask.unsqueeze(-1).to(x.dtype), weights


def locality_bias(n: int, slopes: Tensor) -> Tensor:
    """ALiBi-style (1, H, n, n) bias -slope_h * |i - j| favouring the same utterance."""
    idx = torch.arange(n, device=slopes.device)
    dist = (idx[:, None] - idx[None, :]).abs().to(slopes.dtype)
    return -slopes[None, :, None, None] * dist


class CrossBlock(nn.Module):
    """anchor += CrossAttention(LN anchor, LN other) over the other's present utterances."""

    def __init__(self, config: ITEACHConfig) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(config.hidden), nn.LayerNorm(config.hidden)
        self.attn = MultiHeadAttention(config.hidden, config.heads, config.dropout)
        self.drop = nn.Dropout(config.dropout)
        slopes = 2.0 ** (config.locality_top - config.locality_span * torch.arange(config.heads) / config.heads)
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, anchor: Tensor, other: Tensor, present: Tensor, mask: Tensor) -> Tensor:
        bias = attention_bias(present) + locality_bias(anchor.shape[1], self.slopes)
        out = self.attn(self.norm_q(anchor), self.norm_kv(other), bias, present.any(-1))
        return (anchor + self.drop(out)) * mask.unsqueeze(-1).to(anchor.dtype)


class EncoderLayer(nn.Module):
    """A Metaformer block per modality, then the others merged into the anchor in order."""

    def __init__(self, modalities: tuple[str, ...], mixers: tuple[str, ...], config: ITEACHConfig):
        super().__init__()
        self.anchor, self.others = modalities[0], modalities[1:]
        self.blocks = nn.ModuleDict({m: MetaformerBlock(mixers, config) for m in modalities})
        self.cross = nn.ModuleDict({m: CrossBlock(config) for m in self.others})

    def forward(
        self, xs: dict[str, Tensor], present: dict[str, Tensor], ecce: dict[str, Tensor], mask: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """xs/present/ecce: modality -> (B, N, d) / (B, N) / (B, N, N). Returns the new
        streams and the router weights (B, N, K) per modality (empty without router)."""
        out, routes = {}, {}
        for m, block in self.blocks.items():
            out[m], weights = block(xs[m], present[m], ecce[m], mask)
            if weights is not None:
                routes[m] = weights
        for m in self.others:
            out[self.anchor] = self.cross[m](out[self.anchor], out[m], present[m], mask)
        return out, routes


@dataclass
class BranchOutput:
    """logits (B, N, C); hidden: anchor stream after each layer, first to last, each
    (B, N, d); routes: per layer, modality -> router weights (B, N, K)."""

    logits: Tensor
    hidden: list[Tensor]
    routes: list[dict[str, Tensor]]


class Branch(nn.Module):
    """Teacher or student: projections, ECCE, ``n_layers`` encoder layers, classifier."""

    def __init__(self, config: ITEACHConfig, n_layers: int, mixers: tuple[str, ...]) -> None:
        super().__init__()
        mods = config.modalities
        anchor = "text" if "text" in mods else mods[0]
        self.order = (anchor, *[m for m in mods if m != anchor])
        d = config.hidden
        self.proj = nn.ModuleDict({m: nn.Linear(config.input_dims[m], d) for m in mods})
        self.ecce = nn.ModuleDict({m: ECCE(d, config.window, config.dist) for m in mods})
        self.layers = nn.ModuleList(EncoderLayer(self.order, mixers, config) for _ in range(n_layers))
        self.drop = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.n_classes)

    def forward(self, inputs: dict[str, tuple[Tensor, Tensor]], mask: Tensor) -> BranchOutput:
        """inputs: modality -> (features (B, N, D_m) zero where absent, present (B, N));
        mask (B, N) real utterances."""
        n, d = mask.shape[1], self.norm.normalized_shape[0]
        pos = sinusoidal_positions(n, d, device=mask.device)
        xs, present, ecce = {}, {}, {}
        for m in self.order:
            x, present[m] = inputs[m]
            h = self.proj[m](x) * present[m].unsqueeze(-1).to(x.dtype)
            ecce[m] = self.ecce[m](h)
            xs[m] = self.drop(h + pos) * mask.unsqueeze(-1).to(x.dtype)
        hidden, routes = [], []
        for layer in self.layers:
            xs, r = layer(xs, present, ecce, mask)
            hidden.append(xs[self.order[0]])
            routes.append(r)
        logits = self.head(self.norm(hidden[-1]))
        return BranchOutput(logits, hidden, routes)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean of (a - b)^2 over valid utterances (mask (B, N)) and units; a, b (B, N, d)."""
    valid = mask.unsqueeze(-1).to(a.dtype)
    count = valid.sum().clamp_min(1.0) * a.shape[-1]
    return (((a - b) ** 2) * valid).sum() / count


# ---------------------------------------------------------------------------
# The model.


@register_model("iteach")
class ITEACHNet(FusionModel):
    """Inverted teacher-student: a 3-layer teacher on complete data, a 4-layer NAS student
    on incomplete data, distance loss on the last three hidden states (see module doc).

    forward -> ModelOutput(logits = student (B, N, C), aux = {"student_hidden": [H'1, H'2,
    H'3], "routes": per student layer {modality: (B, N, K)}, and in training mode
    "teacher_logits" (B, N, C), "teacher_hidden": [H1, H2, H3]}), H1 the last layer.
    """

    config_class = ITEACHConfig

    def __init__(self, config: ITEACHConfig) -> None:
        super().__init__(config)
        self.config: ITEACHConfig = config
        for name in config.mixers:
            if name not in CANDIDATES:
                raise ValueError(f"unknown ITEACH mixer {name!r}; choose from {CANDIDATES}")
        self.teacher = Branch(config, config.teacher_layers, ("attention",))
        self.student = Branch(config, config.student_layers, tuple(config.mixers))
        self.n_distances = min(config.teacher_layers, config.student_layers, len(config.distance_weights))

    def _view(self, batch: Batch, complete: bool) -> dict[str, tuple[Tensor, Tensor]]:
        return {m: batch.modality(m, complete=complete) for m in self.modalities}

    def forward(self, batch: Batch) -> ModelOutput:
        k = self.n_distances
        student = self.student(self._view(batch, complete=False), batch.mask)
        aux: dict[str, Any] = {"student_hidden": student.hidden[::-1][:k], "routes": student.routes}
        if self.training:
            teacher = self.teacher(self._view(batch, complete=True), batch.mask)
            aux["teacher_logits"] = teacher.logits
            aux["teacher_hidden"] = teacher.hidden[::-1][:k]
        return ModelOutput(student.logits, aux)

    def compute_loss(self, out: ModelOutput, batch: Batch, class_weights: Tensor | None = None) -> LossOutput:
        """CE(student) [+ CE(teacher) + sum_k w_k MSE(H'_k, H_k.detach()) in training].

        parts: ce_student, and with a teacher ce_teacher, dist_1.. (weighted), total."""
        assert batch.labels is not None
        terms = {"ce_student": masked_ce(out.logits, batch.labels, class_weights)}
        if "teacher_logits" in out.aux:
            terms["ce_teacher"] = masked_ce(out.aux["teacher_logits"], batch.labels, class_weights)
            pairs = zip(out.aux["student_hidden"], out.aux["teacher_hidden"], strict=True)
            for k, (hs, ht) in enumerate(pairs):
                weight = self.config.distance_weights[k]
                terms[f"dist_{k + 1}"] = weight * masked_mse(hs, ht.detach(), batch.mask)
        total = torch.stack(list(terms.values())).sum()
        parts = {name: float(t.detach()) for name, t in terms.items()}
        parts["total"] = float(total.detach())
        return LossOutput(total, parts)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Router parameters at ``router_lr_scale`` x lr (paper: 5e-3 vs 5e-4), rest at lr."""
        router, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (router if ".router." in name else rest).append(p)
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if router:
            lr_router = lr * self.config.router_lr_scale
            groups.append({"params": router, "lr": lr_router, "weight_decay": weight_decay})
        return groups
