"""SUMMER: sparse dynamic MoE + hierarchical cross-modal fusion + unimodal-teacher distillation.

Built from the paper (arXiv 2503.23721, "Unimodal-driven Distillation in Multimodal Emotion
Recognition with Dynamic Fusion"); no official code exists. Shapes: B conversations,
N utterances (the sequence axis), H hidden size, h heads, E experts, C classes, M' the
modalities the model is built for (``config.modalities``).

Pipeline, per modality m (student) and for the text teacher::

    U_e = Linear(D_m -> H)(x_m) + speaker embedding + absolute position      (Eq. 1-2)
    SDMoE: E BiGRU experts, token-wise gate, mu +- alpha*sigma sparsification,
           Gumbel-softmax with learnable temperature tau; U = U_e + sum_i G_i E_i  (Eq. 3-5)
    HCMF:  n_layers layers; in each, every branch runs teacher-guided self-attention
           (DynAttn, Eq. 7-8), then the lead (text) stream fuses hierarchically
           H_ta = DynAttn(text, audio, audio), H_tav = DynAttn(H_ta, visual, visual) (Eq. 9-10),
           all with residual connections, then a feed-forward block per branch.
    GMoE:  router V_g over [f_text; f_audio; f_visual] -> softmax weights over the
           modalities present at each utterance; H_fuse = sum_m w_m f_m           (Eq. 6)
    classifier: Linear(H -> C) on H_fuse.

Training has two stages (``stages``): "teacher" trains the text-only teacher (same embedding +
SDMoE + self-attention encoder + classifier) with cross-entropy; "student" freezes it
(requires_grad False, eval mode, run under no_grad) and trains the student with
``k1 L_cross + k2 L_align + k3 L_inner + k4 L_smooth`` (Eq. 11-15).

Choices where the paper is silent or ambiguous (and why):

* Number of experts E: not given. Default 8: with per-token statistics the mu +- 2 sigma rule
  can never remove an expert when E <= 5 (the largest |z-score| of E values is (E-1)/sqrt(E)).
* Expert = BiGRU(H -> H/2 per direction), so its output is H; "parameters shared within a
  modality" is read as: each modality (and the teacher) has its own bank of E distinct experts,
  shared over all utterances. All experts of all modalities run together in one masked time
  loop (:class:`BiGRUExperts`, numerically equal to packed ``nn.GRU``s, tested) so padding
  never leaks; this replaces S * E packed GRU calls and halves the tiny model's step time.
* Gate (Eq. 3-4): logits W_g = Linear(H -> E)(U_e) per utterance; mu and sigma (population
  std) are taken over the E logits of that utterance; experts with |W_g - mu| > alpha*sigma
  are removed (closed interval, so E equal logits keep all); the kept logits go through a
  Gumbel-softmax with learnable temperature tau = exp(log_tau) (init ``tau``). Gumbel noise
  only in training; eval is deterministic. Soft (not straight-through) weights.
* SDMoE output is added to its input (residual) so the gate can never silence a branch.
* Positions: fixed sinusoidal absolute encoding (no maximum conversation length).
* Encoders: pre-LayerNorm transformer sublayers (stabler than BERT's post-LN when training
  from scratch), FFN width ``ffn_mult * H`` (default H, as in SDT, on which the paper builds),
  a final LayerNorm per branch. No BatchNorm anywhere.
* DynAttn (Eq. 7-8): s_st and s_tr are the per-head scaled scores QK^T/sqrt(d_head) of the
  student attention and of the teacher's self-attention at the same layer (both N x N since
  utterances are the tokens, also for cross-modal attention). Where |s_tr - s_st| >
  ``dyn_threshold`` the attention probability is multiplied by (1 - phi) (no renormalisation,
  as Eq. 8 is written). phi is not given: default 0.5. Guidance is applied in every student
  attention (each branch's self-attention and both cross-modal fusions).
* Masking: keys where the key modality is absent (or padding) are masked; a query row with no
  valid key gets a zero attention output (its residual is kept), never NaN.
* GMoE (Eq. 6 is underspecified): V_g = Linear(M'H -> M') on the concatenated branch outputs
  gives one logit per modality per utterance; modalities absent at that utterance are excluded
  (the text-led fused stream counts as text); if none is present all are used.
* Text-only model: the student has the text branch alone (no cross-modal fusion, GMoE weight 1)
  and still learns from the teacher through the distillation terms.
* Not modelled: the paper's DialogueRNN over pre-extracted features (the BiGRU experts already
  carry conversational context) and its feature extractors (features arrive pre-computed).
* Teacher modality: text if the model has it, else the first built modality. The teacher sees
  the same ``present`` view as the student (what the model may see at inference).
* Distillation: "intermediate features" = the student's H_fuse and the teacher's final
  (pre-classifier) feature. L_cross = KL(p_teacher || p_student) with both distributions from
  the frozen teacher classifier (standard KD direction; Eq. 11 is garbled), T = 1, mean over
  utterances; L_align = CE of teacher-classifier(H_fuse); L_inner = MSE(H_fuse, f_teacher);
  L_smooth = label-smoothed CE of the student classifier. Eq. 14 gives the true class eps and
  the others (1 - eps)/(C - 1); that is PyTorch's ``label_smoothing = (1 - eps) C / (C - 1)``.
  The paper gives no value: ``label_smoothing = 0.1``.
  Loss weights are not given beyond "k4 highest": k1 = k2 = k3 = 0.5, k4 = 1. Class weights,
  when given, apply to the CE terms. The teacher stage uses plain (weighted) CE.
* Dropout is not given: 0.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.common import (
    Batch,
    FusionConfig,
    FusionModel,
    LossOutput,
    ModelOutput,
    key_padding_bias,
    masked_ce,
    merge_heads,
    sinusoidal_positions,
    split_heads,
)
from models.registry import register_model

# Small variant for tests and smoke runs.
TINY: dict[str, Any] = dict(hidden=32, n_heads=2, n_layers=1, n_experts=3, dropout=0.0)


@dataclass
class SummerConfig(FusionConfig):
    """Paper defaults (hidden 1024, 4 heads, 6 fusion layers, tau 0.5, alpha 2); see module doc."""

    hidden: int = 1024
    n_heads: int = 4
    n_layers: int = 6
    ffn_mult: int = 1
    n_experts: int = 8
    tau: float = 0.5  # initial Gumbel-softmax temperature (learnable)
    alpha: float = 2.0  # experts outside mu +- alpha * sigma are removed
    dyn_threshold: float = 0.5  # DynAttn: |s_teacher - s_student| above this is damped
    phi: float = 0.5  # DynAttn damping factor
    k1: float = 0.5  # L_cross (KL through the teacher classifier)
    k2: float = 0.5  # L_align (CE through the teacher classifier)
    k3: float = 0.5  # L_inner (MSE to the teacher feature)
    k4: float = 1.0  # L_smooth (label-smoothed CE of the student), the largest
    label_smoothing: float = 0.1
    dropout: float = 0.2


# ---------------------------------------------------------------------------
# Sparse dynamic mixture of experts.


def sparse_gate(logits: Tensor, tau: Tensor, alpha: float, noise: bool) -> tuple[Tensor, Tensor]:
    """Dynamic routing (Eq. 3-4). logits (..., E) -> weights (..., E) summing to 1, keep (..., E).

    Experts whose logit lies outside [mu - alpha*sigma, mu + alpha*sigma] (statistics over the
    E logits of each token) get weight 0; the rest share a Gumbel-softmax at temperature tau.
    """
    mu = logits.mean(-1, keepdim=True)
    sigma = logits.std(-1, unbiased=False, keepdim=True)
    keep = (logits - mu).abs() <= alpha * sigma
    keep = keep | ~keep.any(-1, keepdim=True)  # cannot happen for alpha >= 1; safety
    z = logits
    if noise:
        u = torch.rand_like(logits).clamp(1e-6, 1.0 - 1e-6)
        z = z - torch.log(-torch.log(u))
    z = (z / tau).masked_fill(~keep, float("-inf"))
    return z.softmax(-1), keep


def _uniform(bound: float, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class BiGRUExperts(nn.Module):
    """S streams x E independent BiGRU experts, run in one time loop batched over all of them.

    x (B, N, S, D), valid (B, N) bool (real utterances) -> (B, N, S, E, 2 * hidden), zero at
    padding. Stream s (a modality) feeds only its own E experts. Same equations and
    initialisation as ``nn.GRU(bidirectional=True)``. Invalid steps leave the state unchanged,
    so the backward direction starts from zero at each conversation's last utterance: exactly
    what a packed sequence gives, but one loop serves every expert of every modality (S * E
    packed ``nn.GRU`` calls were the bulk of CPU time).
    """

    def __init__(self, n_streams: int, n_experts: int, in_dim: int, hidden: int) -> None:
        super().__init__()
        shape, bound = (n_streams, n_experts, 2), 1.0 / math.sqrt(hidden)
        self.w_ih, self.w_hh = _uniform(bound, *shape, in_dim, 3 * hidden), _uniform(bound, *shape, hidden, 3 * hidden)
        self.b_ih, self.b_hh = _uniform(bound, *shape, 1, 3 * hidden), _uniform(bound, *shape, 1, 3 * hidden)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        n_str, n_exp, _, hid, _ = self.w_hh.shape
        w_hh, b_hh = self.w_hh.flatten(0, 1), self.b_hh.flatten(0, 1)  # G = S * E groups
        gi = torch.einsum("bnsd,sejdk->sejnbk", x, self.w_ih) + self.b_ih[:, :, :, None]
        gi = gi.flatten(0, 1)  # (G, 2, N, B, 3h)
        gi = torch.stack([gi[:, 0], gi[:, 1].flip(1)], dim=1)  # backward direction runs reversed
        step_valid = torch.stack([valid.T, valid.flip(1).T])[..., None]  # (2, N, B, 1)
        h = x.new_zeros(n_str * n_exp, 2, x.shape[0], hid)
        states = []
        for t in range(x.shape[1]):
            i_r, i_z, i_n = gi[:, :, t].chunk(3, dim=-1)
            h_r, h_z, h_n = (h @ w_hh + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            h = torch.where(step_valid[:, t], (1 - z) * torch.tanh(i_n + r * h_n) + z * h, h)
            states.append(h)
        out = torch.stack(states, dim=2)  # (G, 2, N, B, h)
        out = torch.cat([out[:, 0], out[:, 1].flip(1)], dim=-1)  # (G, N, B, 2h)
        out = out.unflatten(0, (n_str, n_exp)).permute(3, 2, 0, 1, 4)  # (B, N, S, E, 2h)
        return out * valid[..., None, None, None].to(out.dtype)


class SDMoE(nn.Module):
    """One sparse dynamic MoE per stream (modality), computed together.

    u (B, N, S, H), valid (B, N) -> u + sum_i G_i E_i (B, N, S, H), gates G (B, N, S, E).
    Each stream has its own E BiGRU experts, gate W_g (H -> E) and learnable temperature tau.
    """

    def __init__(self, n_streams: int, cfg: SummerConfig) -> None:
        super().__init__()
        hid, n_exp = cfg.hidden, cfg.n_experts
        self.experts = BiGRUExperts(n_streams, n_exp, hid, hid // 2)
        self.gate_w, self.gate_b = _uniform(hid**-0.5, n_streams, hid, n_exp), _uniform(hid**-0.5, n_streams, n_exp)
        self.log_tau = nn.Parameter(torch.full((n_streams, 1), math.log(cfg.tau)))
        self.alpha = cfg.alpha
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def tau(self) -> Tensor:
        """(S, 1) Gumbel-softmax temperatures, kept >= 0.05."""
        return self.log_tau.exp().clamp(min=0.05)

    def forward(self, u: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        experts = self.experts(u, valid)  # (B, N, S, E, H)
        logits = torch.einsum("bnsh,she->bnse", u, self.gate_w) + self.gate_b
        gates, _ = sparse_gate(logits, self.tau, self.alpha, noise=self.training)
        return u + self.drop((gates.unsqueeze(-1) * experts).sum(3)), gates


class Embed(nn.Module):
    """U_e = Linear(x) + speaker + position (Eq. 1-2). x (B, N, D), speakers (B, N) -> (B, N, H)."""

    def __init__(self, in_dim: int, cfg: SummerConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, cfg.hidden)
        self.speaker = nn.Embedding(cfg.n_speakers, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, speakers: Tensor) -> Tensor:
        pos = sinusoidal_positions(x.shape[1], self.proj.out_features, x.device)
        return self.drop(self.proj(x) + self.speaker(speakers) + pos)


# ---------------------------------------------------------------------------
# Teacher-guided attention and transformer sublayers.


class DynAttention(nn.Module):
    """Multi-head attention with teacher-guided damping (DynAttn, Eq. 7-8).

    q (B, N, H), kv (B, N, H), key_valid (B, N) bool, teacher_scores (B, h, N, N) or None
    -> out (B, N, H), scores (B, h, N, N) = QK^T / sqrt(d_head) before masking.
    """

    def __init__(self, hidden: int, n_heads: int, threshold: float, phi: float) -> None:
        super().__init__()
        self.n_heads, self.threshold, self.phi = n_heads, threshold, phi
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(
        self, q: Tensor, kv: Tensor, key_valid: Tensor, teacher_scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        qh, kh, vh = (split_heads(t, self.n_heads) for t in (self.q(q), self.k(kv), self.v(kv)))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        probs = (scores + key_padding_bias(key_valid)).softmax(-1)
        probs = probs * key_valid[:, None, None, :].to(probs.dtype)  # rows without keys -> 0
        if teacher_scores is not None:
            far = (teacher_scores - scores.detach()).abs() > self.threshold
            probs = probs * (1.0 - self.phi * far.to(probs.dtype))
        out = merge_heads(probs @ vh)
        return self.o(out), scores


class AttnBlock(nn.Module):
    """Pre-LN residual attention: x + drop(DynAttn(LN(x), LN(kv))). Shapes as DynAttention."""

    def __init__(self, cfg: SummerConfig, cross: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(cfg.hidden)
        self.norm_kv = nn.LayerNorm(cfg.hidden) if cross else self.norm_q
        self.attn = DynAttention(cfg.hidden, cfg.n_heads, cfg.dyn_threshold, cfg.phi)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, kv: Tensor, key_valid: Tensor, teacher_scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        out, scores = self.attn(self.norm_q(x), self.norm_kv(kv), key_valid, teacher_scores)
        return x + self.drop(out), scores


class FFNBlock(nn.Module):
    """Pre-LN residual feed-forward: x + drop(W2 drop(gelu(W1 LN(x)))). (B, N, H) -> (B, N, H)."""

    def __init__(self, cfg: SummerConfig) -> None:
        super().__init__()
        width = cfg.ffn_mult * cfg.hidden
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.hidden),
            nn.Linear(cfg.hidden, width),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(width, cfg.hidden),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


# ---------------------------------------------------------------------------
# Teacher and student.


@dataclass
class TeacherOutput:
    """feature (B, N, H) pre-classifier, logits (B, N, C), scores: per layer (B, h, N, N)."""

    feature: Tensor
    logits: Tensor
    scores: list[Tensor]


class UnimodalTeacher(nn.Module):
    """Text-only teacher: Embed (with SDMoE) + n_layers self-attention encoder + classifier."""

    def __init__(self, in_dim: int, cfg: SummerConfig) -> None:
        super().__init__()
        self.embed = Embed(in_dim, cfg)
        self.moe = SDMoE(1, cfg)
        self.attn = nn.ModuleList(AttnBlock(cfg) for _ in range(cfg.n_layers))
        self.ffn = nn.ModuleList(FFNBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x: Tensor, present: Tensor, speakers: Tensor, mask: Tensor) -> TeacherOutput:
        """x (B, N, D) zeroed where absent, present (B, N), speakers (B, N), mask (B, N)."""
        h = self.moe(self.embed(x, speakers).unsqueeze(2), mask)[0].squeeze(2)
        scores = []
        for attn, ffn in zip(self.attn, self.ffn, strict=True):
            h, s = attn(h, h, present)
            h = ffn(h)
            scores.append(s)
        feature = self.norm(h)
        return TeacherOutput(feature, self.classifier(feature), scores)


class HCMFLayer(nn.Module):
    """One hierarchical cross-modal fusion layer over the branches in ``modalities``.

    h: modality -> (B, N, H); valid: modality -> (B, N) bool; teacher_scores (B, h, N, N).
    The lead branch (``modalities[0]``) fuses the others in order: text -> audio -> visual.
    """

    def __init__(self, modalities: tuple[str, ...], cfg: SummerConfig) -> None:
        super().__init__()
        self.modalities = modalities
        self.self_attn = nn.ModuleDict({m: AttnBlock(cfg) for m in modalities})
        self.cross = nn.ModuleDict({m: AttnBlock(cfg, cross=True) for m in modalities[1:]})
        self.ffn = nn.ModuleDict({m: FFNBlock(cfg) for m in modalities})

    def forward(
        self, h: dict[str, Tensor], valid: dict[str, Tensor], teacher_scores: Tensor | None
    ) -> dict[str, Tensor]:
        out = {m: self.self_attn[m](h[m], h[m], valid[m], teacher_scores)[0] for m in self.modalities}
        lead = self.modalities[0]
        for m in self.modalities[1:]:  # H_ta = DynAttn(H_t, a, a); H_tav = DynAttn(H_ta, v, v)
            out[lead] = self.cross[m](out[lead], out[m], valid[m], teacher_scores)[0]
        return {m: self.ffn[m](x) for m, x in out.items()}


class Student(nn.Module):
    """Multimodal student: per-modality Embed + SDMoE, HCMF layers, GMoE, classifier."""

    def __init__(self, cfg: SummerConfig) -> None:
        super().__init__()
        mods = cfg.modalities
        self.modalities = mods
        self.embed = nn.ModuleDict({m: Embed(cfg.input_dims[m], cfg) for m in mods})
        self.moe = SDMoE(len(mods), cfg)
        self.layers = nn.ModuleList(HCMFLayer(mods, cfg) for _ in range(cfg.n_layers))
        self.norm = nn.ModuleDict({m: nn.LayerNorm(cfg.hidden) for m in mods})
        self.router = nn.Linear(len(mods) * cfg.hidden, len(mods))  # V_g
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, batch: Batch, teacher_scores: list[Tensor]) -> dict[str, Tensor]:
        """-> fused (B, N, H), logits (B, N, C), router (B, N, M'), gate_<m> (B, N, E)."""
        u, valid, aux = [], {}, {}
        for m in self.modalities:
            x, valid[m] = batch.modality(m)
            u.append(self.embed[m](x, batch.speakers))
        moe, gates = self.moe(torch.stack(u, dim=2), batch.mask)
        h = {m: moe[:, :, i] for i, m in enumerate(self.modalities)}
        aux.update({f"gate_{m}": gates[:, :, i] for i, m in enumerate(self.modalities)})
        for layer, scores in zip(self.layers, teacher_scores, strict=True):
            h = layer(h, valid, scores)
        fused, aux["router"] = self.global_moe([self.norm[m](h[m]) for m in self.modalities], valid)
        aux["fused"], aux["logits"] = fused, self.classifier(self.drop(fused))
        return aux

    def global_moe(self, feats: list[Tensor], valid: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """GMoE (Eq. 6): feats M' x (B, N, H) -> fused (B, N, H), weights (B, N, M')."""
        stacked = torch.stack(feats, dim=2)
        present = torch.stack([valid[m] for m in self.modalities], dim=-1)
        present = present | ~present.any(-1, keepdim=True)
        logits = self.router(torch.cat(feats, dim=-1)).masked_fill(~present, float("-inf"))
        weights = logits.softmax(-1)
        return (weights.unsqueeze(-1) * stacked).sum(2), weights


# ---------------------------------------------------------------------------
# The model.


@register_model("summer")
class Summer(FusionModel):
    """SUMMER (see module docstring). forward(batch).logits: (B, N, C) of the current stage."""

    config_class = SummerConfig
    stages: ClassVar[tuple[str, ...]] = ("teacher", "student")

    def __init__(self, config: SummerConfig) -> None:
        super().__init__(config)
        if config.hidden % 2 or config.hidden % config.n_heads:
            raise ValueError("hidden must be even (BiGRU halves) and divisible by n_heads")
        self.cfg = config
        self.teacher_modality = "text" if "text" in config.modalities else config.modalities[0]
        self.teacher = UnimodalTeacher(config.input_dims[self.teacher_modality], config)
        self.student = Student(config)
        self.set_stage(self.stage)

    def set_stage(self, stage: str) -> None:
        """Stage "teacher": only the teacher trains. Stage "student": teacher frozen, in eval mode."""
        super().set_stage(stage)
        teaching = stage == "teacher"
        self.teacher.requires_grad_(teaching)
        self.student.requires_grad_(not teaching)
        self.train(self.training)

    def train(self, mode: bool = True) -> Summer:
        super().train(mode)
        if self.stage != "teacher":
            self.teacher.eval()
        return self

    def run_teacher(self, batch: Batch) -> TeacherOutput:
        x, present = batch.modality(self.teacher_modality)
        return self.teacher(x, present, batch.speakers, batch.mask)

    def forward(self, batch: Batch) -> ModelOutput:
        if self.stage == "teacher":
            t = self.run_teacher(batch)
            return ModelOutput(t.logits, {"teacher_feature": t.feature, "teacher_logits": t.logits})
        with torch.no_grad():
            t = self.run_teacher(batch)
        aux: dict[str, Any] = self.student(batch, t.scores)
        aux.update(teacher_feature=t.feature, teacher_logits=t.logits)
        return ModelOutput(aux["logits"], aux)

    def compute_loss(self, out: ModelOutput, batch: Batch, class_weights: Tensor | None = None) -> LossOutput:
        labels = batch.labels
        if labels is None:
            raise ValueError("compute_loss needs labels")
        if self.stage == "teacher":
            ce = masked_ce(out.logits, labels, class_weights)
            return LossOutput(ce, {"teacher_ce": float(ce.detach())})
        parts = self.distillation_losses(out, batch.mask, labels, class_weights)
        c = self.cfg
        total = c.k1 * parts["cross"] + c.k2 * parts["align"] + c.k3 * parts["inner"] + c.k4 * parts["smooth"]
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    def distillation_losses(
        self, out: ModelOutput, mask: Tensor, labels: Tensor, class_weights: Tensor | None
    ) -> dict[str, Tensor]:
        """L_cross, L_align, L_inner, L_smooth (Eq. 11-14); mask (B, N), labels (B, N)."""
        fused, t_feat, t_logits = out.aux["fused"], out.aux["teacher_feature"], out.aux["teacher_logits"]
        via_teacher = self.teacher.classifier(fused)  # frozen head, gradient flows into fused
        kl = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - via_teacher.log_softmax(-1))).sum(-1)
        return {
            "cross": _masked_mean(kl, mask),
            "align": masked_ce(via_teacher, labels, class_weights),
            "inner": _masked_mean((fused - t_feat).pow(2).mean(-1), mask),
            "smooth": masked_ce(out.logits, labels, class_weights, self.cfg.label_smoothing),
        }


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values (B, N) over mask (B, N) True; 0 (with grad) when the mask is empty."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)
