"""DMD: Decoupled Multimodal Distillation (Li, Wang and Cui, CVPR 2023).

Shapes: B conversations, N utterances (the sequence axis), d hidden, C classes, and
M = number of modalities the model is built for (``config.modalities``, 1 to 3).
Every per-modality hidden state below is (B, N, d) unless stated otherwise.

Pipeline (per the paper and the official code, mdswyz/DMD):

1. Projection: x~_m = Conv1d(D_m -> d, kernel k_m, no bias) across utterances.
2. Decoupling: private s_m = E_m(x~_m) per modality, shared c_m = E_c(x~_m) with ONE
   encoder E_c for all modalities, reconstruction r_m = D_m([s_m; c_m]), cycle
   s~_m = E_m(r_m). E_m, E_c, D_m are kernel-1 Conv1d without bias (here the equivalent
   ``nn.Linear(bias=False)`` applied per utterance).
3. HomoGD: per modality a residual MLP head on c_m (hidden (B, N, d), logits (B, N, C))
   and a graph-distillation (GD) unit over those logits. Homo fusion: a MulT
   self-attention encoder on each c_m, concatenated (B, N, M*d), residual MLP, head.
4. HeteroGD: for each target m, MulT cross-modal encoders (queries s_m, keys/values
   s_src) for the M-1 other sources, concatenated (B, N, (M-1)*d), then a self-attention
   "memory" encoder, residual MLP head, and a second GD unit over those logits.
5. Fusion: gated projections of the M hetero hiddens and of the homo-fusion hidden,
   concatenated (B, N, M*h + M*d), residual MLP, output head -> logits (B, N, C).
6. Loss (code weights): CE on fused + every branch (M homo, M hetero, homo fusion)
   + 0.05 GD_homo + 0.05 GD_hetero + 0.1 (L_cyc + L_rec + 0.1 (L_mar + L_ort)).

GD unit: z_m = [W_logit(logits_m); W_repr(hidden_m)]; edge e(j <- i) = W_edge([z_j; z_i])
per ordered pair and utterance; edges = softmax(alpha * e) over the available pairs
(alpha = 1/8 as in the code); L = sum_pairs mean_u (edge + prior) * |logits_j -
logits_i.detach()|_1 + gd_reg * sum_pairs (mean_u edge - mean_u prior)^2. The prior is
softmax(p / 0.25) with p = 1 on text -> audio, text -> visual (and, for HeteroGD,
visual -> audio), 0 elsewhere, as in the code.

Adaptation to ERC and other deviations (all deliberate):

- The sequence axis is the utterances of a conversation, not words; every branch keeps
  it, so all heads give per-utterance logits (B, N, C) where the original pools the
  last time step into one score per clip. Task losses are cross-entropy (the original is
  L1 regression on MOSI); ``class_weights`` go to every CE term. Distillation uses the
  L1 distance between raw logits, as the code does with its 1-d outputs.
- Conv1d projections use zero 'same' padding ((k-1)//2 left, k//2 right) instead of
  the code's valid padding, so that every utterance keeps its output. Hidden states are
  zeroed at padded utterances and where the modality is absent before the conv, so
  padding never changes valid outputs. The code skips the projection when D_m == d; we
  always project.
- MulT encoders (pre-LN, sqrt(d) input scale, sinusoidal positions, ReLU FFN 4d, final
  LN, shared LN for query and keys) attend over the utterances with key padding masks
  and without the code's future mask (``attn_mask`` true in the code): ERC here is
  offline and every other model sees the whole conversation.
- Missing modalities (not in the paper): a modality's states are zero at utterances
  where it is absent, absent utterances are masked as attention keys (a row with no
  valid key gets a zero attention context), and per-modality CE, decoupling and GD
  terms only count utterances where the modality (for GD: both ends of an edge) is
  present. The GD softmax and its prior are restricted (and renormalised) to the pairs
  available at each utterance. With one modality there are no cross-modal encoders (the
  memory encoder runs on s_m, width d) and the GD units have no edges (zero loss).
- Hetero width is h = max(1, M-1) * d (2d with three modalities, as in the code).
- Fusion gates: g = h * sigmoid(W h). The code feeds sigmoid(W h) itself to the final
  MLP; the paper describes an adaptive weight per branch, which the gate form matches
  while keeping the feature scale.
- L_ort is computed per utterance: max(0, cos(s_m, c_m)) averaged over present
  utterances, summed over modalities (code: CosineEmbeddingLoss, target -1, margin 0).
  L_rec and L_cyc are per-modality MSEs over present utterances, summed over modalities.
- L_mar follows Eq. 4 exactly (anchor i, positive j: same label, other modality;
  negative k: same modality, other label; mean over all such triples in the batch),
  with a fixed margin (``margin``); the code instead uses 0.15 * |label difference| on
  regression scores and ignores modalities. Features are the per-utterance c_m (the
  code's extra align layers only reduced flattened sequences).
- Text input dropout (code: 0.5) is kept. Speakers are not used (as in the paper).
- Training recipe of the code, for the trainer: Adam lr 1e-4, weight decay 5e-3 (MOSI),
  batch 16, grad clip by value 0.6, ReduceLROnPlateau, early stop on dev.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    IGNORE_INDEX,
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

TINY: dict[str, Any] = {
    "d_model": 16,
    "n_heads": 2,
    "layers": 1,
    "mem_layers": 1,
    "attn_dropout": 0.0,
    "attn_dropout_audio": 0.0,
    "attn_dropout_visual": 0.0,
    "embed_dropout": 0.0,
    "output_dropout": 0.0,
    "text_dropout": 0.0,
    "gd_size": 8,
}


@dataclass
class DMDConfig(FusionConfig):
    """DMD hyper-parameters; defaults are the official code's CMU-MOSI configuration.

    ``layers`` (code: nlevels) is the depth of the cross-modal and homo self-attention
    encoders, ``mem_layers`` that of the memory encoders (code: max(nlevels, 3) = 4).
    Attention dropout as in the code's ``get_network``: a cross-modal encoder uses the rate
    of its source modality (``attn_dropout`` for text, ``attn_dropout_audio``/``_visual``),
    a homo self-attention encoder that of its modality, the memory encoders ``attn_dropout``.
    """

    d_model: int = 50
    n_heads: int = 10
    kernel_text: int = 5
    kernel_audio: int = 5
    kernel_visual: int = 5
    layers: int = 4
    mem_layers: int = 4
    attn_dropout: float = 0.3
    attn_dropout_audio: float = 0.2
    attn_dropout_visual: float = 0.0
    relu_dropout: float = 0.0
    res_dropout: float = 0.0
    embed_dropout: float = 0.2
    output_dropout: float = 0.5
    text_dropout: float = 0.5
    gd_size: int = 32
    gd_alpha: float = 0.125
    gd_prior_temperature: float = 0.25
    gd_reg: float = 10.0
    w_homo_gd: float = 0.05
    w_hetero_gd: float = 0.05
    w_decouple: float = 0.1
    w_inner: float = 0.1
    margin: float = 0.15


# ---------------------------------------------------------------------------
# MulT transformer encoder over utterances.


class MaskedAttention(nn.Module):
    """Multi-head attention with an additive key bias. q (B, Nq, E), k/v (B, Nk, E)."""

    int8_skip = ("in_proj",)  # its weight is sliced in forward (models.common.int8_linear)

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj = nn.Linear(dim, 3 * dim)  # q, k, v stacked, as MulT's in_proj
        self.out = nn.Linear(dim, dim)

    def forward(self, q: Tensor, kv: Tensor, key_valid: Tensor) -> Tensor:
        """key_valid (B, Nk) bool; rows with no valid key get a zero context."""

        dim = q.shape[-1]
        w, b = self.in_proj.weight, self.in_proj.bias
        q = F.linear(q, w[:dim], b[:dim])
        k, v = F.linear(kv, w[dim:], b[dim:]).chunk(2, -1)
        p = self.dropout if self.training else 0.0
        ctx = self.out(masked_attention(q, k, v, key_padding_bias(key_valid), self.heads, p))
        return ctx * key_valid.any(-1)[:, None, None].to(ctx.dtype)


class MulTLayer(nn.Module):
    """Pre-LN block: x + drop(attn(LN x, LN kv)); x + drop(W2 drop(relu(W1 LN x)))."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float) -> None:
        super().__init__()
        self.attn = MaskedAttention(dim, heads, attn_dropout)
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn_in, self.ffn_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x: Tensor, source: Tensor | None, key_valid: Tensor) -> Tensor:
        q = self.norm_attn(x)
        kv = q if source is None else self.norm_attn(source)
        x = x + F.dropout(self.attn(q, kv, key_valid), self.res_dropout, self.training)
        h = F.dropout(F.relu(self.ffn_in(self.norm_ffn(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.ffn_out(h), self.res_dropout, self.training)


class MulTEncoder(nn.Module):
    """MulT encoder (Tsai et al. 2019): self-attention, or cross-modal when ``source`` given.

    x (B, N, E), x_valid (B, N) -> (B, N, E), zero where ``x_valid`` is False.
    source (B, N, E) with source_valid (B, N) supplies keys and values.
    """

    def __init__(self, dim: int, heads: int, layers: int, cfg: DMDConfig, attn_dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MulTLayer(dim, heads, attn_dropout, cfg.relu_dropout, cfg.res_dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.scale, self.embed_dropout = math.sqrt(dim), cfg.embed_dropout

    def _embed(self, x: Tensor) -> Tensor:
        pos = sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        return F.dropout(self.scale * x + pos, self.embed_dropout, self.training)

    def forward(
        self, x: Tensor, x_valid: Tensor, source: Tensor | None = None, source_valid: Tensor | None = None
    ) -> Tensor:
        h = self._embed(x)
        kv = None if source is None else self._embed(source)
        key_valid = x_valid if source_valid is None else source_valid
        for layer in self.layers:
            h = layer(h, kv, key_valid)
        return self.norm(h) * x_valid.unsqueeze(-1).to(h.dtype)


class ResidualHead(nn.Module):
    """Code's proj1/proj2/out_layer: h' = h + W2 drop(relu(W1 h)); logits = W_out h'.

    h (B, N, E) -> (h' (B, N, E), logits (B, N, C)).
    """

    def __init__(self, dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.proj1, self.proj2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, n_classes)
        self.dropout = dropout

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = h + self.proj2(F.dropout(F.relu(self.proj1(h)), self.dropout, self.training))
        return h, self.out(h)


# ---------------------------------------------------------------------------
# Graph distillation unit.


class GraphDistillation(nn.Module):
    """GD unit over the ordered modality pairs (src -> tgt), per utterance.

    ``pairs`` lists (src, tgt) in the code's order (for each target, each source).
    Edge weights (B, N, P) sum to 1 over the pairs available at each utterance.
    """

    def __init__(
        self,
        modalities: tuple[str, ...],
        n_classes: int,
        repr_dim: int,
        favoured: set[tuple[str, str]],
        cfg: DMDConfig,
    ) -> None:
        super().__init__()
        self.pairs = [(src, tgt) for tgt in modalities for src in modalities if src != tgt]
        self.w_logit = nn.Linear(n_classes, cfg.gd_size)
        self.w_repr = nn.Linear(repr_dim, cfg.gd_size)
        self.w_edge = nn.Linear(4 * cfg.gd_size, 1)
        self.alpha, self.reg = cfg.gd_alpha, cfg.gd_reg
        prior = torch.tensor([float(pair in favoured) for pair in self.pairs])
        self.register_buffer("prior", torch.softmax(prior / cfg.gd_prior_temperature, 0), persistent=False)

    def available(self, present: dict[str, Tensor]) -> Tensor:
        """(B, N, P) bool: both ends of the edge present."""
        ref = next(iter(present.values()))
        cols = [present[s] & present[t] for s, t in self.pairs]
        return torch.stack(cols, -1) if cols else ref.new_zeros((*ref.shape, 0))

    def forward(self, logits: dict[str, Tensor], reprs: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        """Edge weights (B, N, P); zero on unavailable pairs and for P = 0."""
        avail = self.available(present)
        if not self.pairs:
            return avail.to(next(iter(logits.values())).dtype)
        z = {m: torch.cat([self.w_logit(logits[m]), self.w_repr(reprs[m])], -1) for m in logits}
        e = torch.cat([self.w_edge(torch.cat([z[t], z[s]], -1)) for s, t in self.pairs], -1)
        e = (self.alpha * e).masked_fill(~avail, torch.finfo(e.dtype).min)
        return torch.softmax(e, -1) * avail.to(e.dtype)

    def loss(self, logits: dict[str, Tensor], edges: Tensor, present: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(distillation, regulariser), scalars; zero without edges."""
        zero = edges.new_zeros(())
        if not self.pairs:
            return zero, zero
        avail = self.available(present).to(edges.dtype)
        rows = avail.amax(-1)
        n_rows = rows.sum()
        if n_rows == 0:
            return zero, zero
        prior = self.prior.to(edges.dtype) * avail
        prior = prior / prior.sum(-1, keepdim=True).clamp_min(1e-12)
        dist = torch.stack([(logits[t] - logits[s].detach()).abs().sum(-1) for s, t in self.pairs], -1)
        distill = ((edges + prior) * dist).sum() / n_rows
        mean_edges = (edges * rows.unsqueeze(-1)).sum((0, 1)) / n_rows
        mean_prior = (prior * rows.unsqueeze(-1)).sum((0, 1)) / n_rows
        return distill, self.reg * (mean_edges - mean_prior).pow(2).sum()


# ---------------------------------------------------------------------------
# Decoupling losses.


def masked_mse(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over the valid utterances. a, b (B, N, d); valid (B, N)."""
    w = valid.unsqueeze(-1).to(a.dtype)
    return ((a - b).pow(2) * w).sum() / (w.sum() * a.shape[-1]).clamp_min(1.0)


def orthogonality(s: Tensor, c: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid utterances of max(0, cos(s, c)). s, c (B, N, d); valid (B, N)."""
    cos = F.cosine_similarity(s, c, dim=-1).clamp_min(0.0)
    w = valid.to(cos.dtype)
    return (cos * w).sum() / w.sum().clamp_min(1.0)


def triplet_margin(feats: Tensor, groups: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Eq. 4: mean over triples of max(0, margin - cos(f_i, f_j) + cos(f_i, f_k)).

    feats (K, d); groups (modality) and labels (K,). Triples (i, j, k): j has i's label
    and another modality, k has i's modality and another label. Exact in O(K^2 log K):
    for a pair (i, j) with a = margin - cos_ij, the sum over negatives k of
    max(0, a + cos_ik) = count(cos_ik > -a) * a + sum of those cos_ik, read off the
    sorted negatives of i.
    """
    f = F.normalize(feats, dim=-1, eps=1e-8)
    cos = f @ f.T
    same_label, same_group = labels[:, None] == labels[None, :], groups[:, None] == groups[None, :]
    pos, neg = same_label & ~same_group, ~same_label & same_group
    n_triples = (pos.sum(1) * neg.sum(1)).sum()
    if n_triples == 0:
        return feats.new_zeros(())
    neg_sorted = torch.sort(cos.masked_fill(~neg, float("-inf")), dim=1).values
    finite = torch.where(torch.isfinite(neg_sorted), neg_sorted, torch.zeros_like(neg_sorted))
    suffix = torch.cat([finite.flip(1).cumsum(1).flip(1), finite.new_zeros(len(f), 1)], 1)
    a = margin - cos
    idx = torch.searchsorted(neg_sorted.detach(), (-a).detach(), right=True)
    per_pair = (len(f) - idx).to(a.dtype) * a + suffix.gather(1, idx)
    return (per_pair * pos.to(a.dtype)).sum() / n_triples.to(a.dtype)


# ---------------------------------------------------------------------------
# The model.


@register_model("dmd")
class DMD(FusionModel):
    """Decoupled multimodal distillation for ERC. See the module docstring for the design.

    forward(batch) -> ModelOutput with logits (B, N, C) from the fusion head and in aux:
    per-modality dicts ``present`` (B, N), ``x_tilde``/``private``/``shared``/``recon``/
    ``cycle`` (B, N, d), ``homo_logits``/``hetero_logits`` (B, N, C), ``homo_hidden``
    (B, N, d), ``hetero_hidden`` (B, N, h); ``homo_fusion_logits`` (B, N, C);
    ``edges_homo``/``edges_hetero`` (B, N, P) with pairs in ``model.gd_homo.pairs``.
    """

    config_class = DMDConfig

    def __init__(self, config: DMDConfig) -> None:
        super().__init__(config)
        cfg, mods, d, c = config, self.modalities, config.d_model, config.n_classes
        self.hetero_dim = d * max(1, len(mods) - 1)
        kernels = {"text": cfg.kernel_text, "audio": cfg.kernel_audio, "visual": cfg.kernel_visual}
        self.kernels = {m: kernels[m] for m in mods}
        self.proj = nn.ModuleDict({m: nn.Conv1d(cfg.input_dims[m], d, kernels[m], bias=False) for m in mods})
        self.private = nn.ModuleDict({m: nn.Linear(d, d, bias=False) for m in mods})
        self.shared = nn.Linear(d, d, bias=False)
        self.decoder = nn.ModuleDict({m: nn.Linear(2 * d, d, bias=False) for m in mods})
        drop = {"text": cfg.attn_dropout, "audio": cfg.attn_dropout_audio, "visual": cfg.attn_dropout_visual}

        def encoder(dim: int, layers: int, p: float) -> MulTEncoder:
            return MulTEncoder(dim, cfg.n_heads, layers, cfg, p)

        self.homo_attn = nn.ModuleDict({m: encoder(d, cfg.layers, drop[m]) for m in mods})
        self.homo_head = nn.ModuleDict({m: ResidualHead(d, c, cfg.output_dropout) for m in mods})
        self.homo_fusion = ResidualHead(len(mods) * d, c, cfg.output_dropout)
        self.cross = nn.ModuleDict(
            {f"{s}_to_{t}": encoder(d, cfg.layers, drop[s]) for t in mods for s in mods if s != t}
        )
        self.memory = nn.ModuleDict({m: encoder(self.hetero_dim, cfg.mem_layers, cfg.attn_dropout) for m in mods})
        self.hetero_head = nn.ModuleDict({m: ResidualHead(self.hetero_dim, c, cfg.output_dropout) for m in mods})
        favoured = {("text", "audio"), ("text", "visual")}
        self.gd_homo = GraphDistillation(mods, c, d, favoured, cfg)
        self.gd_hetero = GraphDistillation(mods, c, self.hetero_dim, favoured | {("visual", "audio")}, cfg)
        self.gate = nn.ModuleDict({m: nn.Linear(self.hetero_dim, self.hetero_dim) for m in mods})
        self.gate_homo = nn.Linear(len(mods) * d, len(mods) * d)
        self.fusion = ResidualHead(len(mods) * (self.hetero_dim + d), c, cfg.output_dropout)

    def _project(self, m: str, x: Tensor, present: Tensor) -> Tensor:
        """Conv1d across utterances with zero 'same' padding. x (B, N, D_m) -> (B, N, d)."""
        cfg: DMDConfig = self.config  # type: ignore[assignment]
        keep = present.unsqueeze(-1).to(x.dtype)
        if m == "text":
            x = F.dropout(x, cfg.text_dropout, self.training)
        k = self.kernels[m]
        h = F.pad((x * keep).transpose(1, 2), ((k - 1) // 2, k // 2))
        return self.proj[m](h).transpose(1, 2) * keep

    def _decouple(self, batch: Batch) -> dict[str, dict[str, Tensor]]:
        """Projection, private/shared encoders, decoder and cycle, per modality."""
        keys = ("present", "x_tilde", "private", "shared", "recon", "cycle")
        parts: dict[str, dict[str, Tensor]] = {k: {} for k in keys}
        for m in self.modalities:
            x, present = batch.modality(m)
            x_tilde = self._project(m, x, present)
            s, c = self.private[m](x_tilde), self.shared(x_tilde)  # ONE shared encoder
            recon = self.decoder[m](torch.cat([s, c], -1))  # code's order [s; c]
            values = (present, x_tilde, s, c, recon, self.private[m](recon))
            for key, value in zip(keys, values, strict=True):
                parts[key][m] = value
        return parts

    def _homo(self, parts: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
        """HomoGD branch on the shared features c_m."""
        present, shared = parts["present"], parts["shared"]
        heads = {m: self.homo_head[m](shared[m]) for m in self.modalities}
        attended = torch.cat([self.homo_attn[m](shared[m], present[m]) for m in self.modalities], -1)
        hidden, logits = self.homo_fusion(attended)
        return {
            "homo_hidden": {m: h for m, (h, _) in heads.items()},
            "homo_logits": {m: z for m, (_, z) in heads.items()},
            "homo_fusion_hidden": hidden,
            "homo_fusion_logits": logits,
        }

    def _hetero(self, parts: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
        """HeteroGD branch: cross-modal then memory encoders on the private features s_m."""
        present, private = parts["present"], parts["private"]
        hidden, logits = {}, {}
        for t in self.modalities:
            sources = [s for s in self.modalities if s != t]
            crossed = [self.cross[f"{s}_to_{t}"](private[t], present[t], private[s], present[s]) for s in sources]
            h = torch.cat(crossed, -1) if crossed else private[t]
            hidden[t], logits[t] = self.hetero_head[t](self.memory[t](h, present[t]))
        return {"hetero_hidden": hidden, "hetero_logits": logits}

    def forward(self, batch: Batch) -> ModelOutput:
        parts = self._decouple(batch)
        aux: dict[str, Any] = {**parts, **self._homo(parts), **self._hetero(parts)}
        present = parts["present"]
        aux["edges_homo"] = self.gd_homo(aux["homo_logits"], aux["homo_hidden"], present)
        aux["edges_hetero"] = self.gd_hetero(aux["hetero_logits"], aux["hetero_hidden"], present)
        gated = []
        for m in self.modalities:
            h = aux["hetero_hidden"][m]
            gated.append(h * torch.sigmoid(self.gate[m](h)) * present[m].unsqueeze(-1).to(h.dtype))
        homo = aux["homo_fusion_hidden"]
        gated.append(homo * torch.sigmoid(self.gate_homo(homo)))
        _, logits = self.fusion(torch.cat(gated, -1))
        return ModelOutput(logits, aux)

    def compute_loss(self, out: ModelOutput, batch: Batch, class_weights: Tensor | None = None) -> LossOutput:
        cfg: DMDConfig = self.config  # type: ignore[assignment]
        aux, labels = out.aux, batch.labels
        assert labels is not None
        present = aux["present"]
        terms: dict[str, Tensor] = {
            "ce_fused": masked_ce(out.logits, labels, class_weights),
            "ce_homo_fusion": masked_ce(aux["homo_fusion_logits"], labels, class_weights),
        }
        for m in self.modalities:
            only_m = labels.masked_fill(~present[m], IGNORE_INDEX)
            terms[f"ce_homo_{m}"] = masked_ce(aux["homo_logits"][m], only_m, class_weights)
            terms[f"ce_hetero_{m}"] = masked_ce(aux["hetero_logits"][m], only_m, class_weights)
        task = sum(terms.values())
        terms["gd_homo"], terms["gd_homo_reg"] = self.gd_homo.loss(aux["homo_logits"], aux["edges_homo"], present)
        terms["gd_hetero"], terms["gd_hetero_reg"] = self.gd_hetero.loss(
            aux["hetero_logits"], aux["edges_hetero"], present
        )
        terms |= self._decoupling_losses(aux, labels)
        total = (
            task
            + cfg.w_homo_gd * (terms["gd_homo"] + terms["gd_homo_reg"])
            + cfg.w_hetero_gd * (terms["gd_hetero"] + terms["gd_hetero_reg"])
            + cfg.w_decouple * (terms["cyc"] + terms["rec"] + cfg.w_inner * (terms["mar"] + terms["ort"]))
        )
        parts = {k: float(v.detach()) for k, v in terms.items()}
        parts["task"] = float(task.detach())
        return LossOutput(total, parts)

    def _decoupling_losses(self, aux: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """L_rec, L_cyc, L_ort (summed over modalities) and L_mar over the batch."""
        cfg: DMDConfig = self.config  # type: ignore[assignment]
        present, mods = aux["present"], self.modalities
        rec = sum(masked_mse(aux["recon"][m], aux["x_tilde"][m], present[m]) for m in mods)
        cyc = sum(masked_mse(aux["cycle"][m], aux["private"][m], present[m]) for m in mods)
        ort = sum(orthogonality(aux["private"][m], aux["shared"][m], present[m]) for m in mods)
        feats, groups, classes = [], [], []
        for i, m in enumerate(mods):
            keep = present[m] & (labels != IGNORE_INDEX)
            feats.append(aux["shared"][m][keep])
            groups.append(torch.full_like(labels[keep], i))
            classes.append(labels[keep])
        mar = triplet_margin(torch.cat(feats), torch.cat(groups), torch.cat(classes), cfg.margin)
        return {"rec": rec, "cyc": cyc, "ort": ort, "mar": mar}
