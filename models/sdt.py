"""SDT: Transformer with self-distillation (Ma et al., IEEE TMM 2023, arXiv 2310.20494).

Shapes: B conversations, N utterances (the sequence axis), H hidden, C classes, and
M = number of modalities the model is built for (``config.modalities``, 1 to 3).

Pipeline (per the paper and the official code, butterfliesss/SDT):

1. Per modality m: Conv1d(D_m -> H, kernel 1, no bias) on the utterance features.
2. Every block adds fixed sinusoidal positions and a learned speaker embedding
   (Embedding(n_speakers + 1, H), index n_speakers = padding) to its inputs, then dropout.
3. For each target m and each source n (n = m: intra-modal, n != m: inter-modal) one
   single-layer transformer block, queries from m, keys and values from n:
   M intra + M(M-1) inter blocks (9 for three modalities, 1 for text only).
4. Unimodal gate on each block output h: z = sigmoid(W h) (H x H, no bias), h <- z * h.
5. Per target m: h_m = Linear(M*H -> H)([gated block outputs of m, source order]).
6. Multimodal gate: softmax over modalities of W h_m (shared W, H x H, no bias),
   per feature dimension; fused = sum_m softmax_m * h_m.
7. Heads: per modality ReLU -> Dropout -> Linear(H, C); fused Linear(H, C).
   ``ModelOutput.logits`` are the fused logits (prediction = their argmax).
8. Loss: CE(fused) + sum_m CE(z_m) + sum_m KL(softmax(z_fused/T) || softmax(z_m/T)).

Choices and deviations (all deliberate):

- Defaults are the paper's: H = 1024, 8 heads, dropout 0.5, d_ff = H, one layer per block.
  T defaults to 1 (the code's IEMOCAP value); the code uses T = 8 on MELD.
- The code freezes the unimodal gate W to the identity on MELD (not in the paper).
  ``identity_gate=True`` reproduces it as z = sigmoid(h) without a parameter; the
  default (False) is the paper's learnable W.
- Loss as in the official code: all gammas 1, no T^2 factor on the KL, teacher
  (fused) probabilities not detached, KL summed over classes and averaged over
  utterances. ``class_weights`` go to every CE term (the code does this on IEMOCAP).
- Missing modalities (not in the paper, which assumes all three): tokens of a modality
  absent at an utterance are zero features (+ position + speaker) and are masked as
  attention keys; a query whose conversation has no valid key for a source gets a zero
  attention context (residual + FFN only) instead of attending to padding. The
  multimodal softmax excludes absent modalities per utterance (uniform fallback when
  none is present, which only padding should hit). Per-modality CE and KL terms are
  taken only over utterances where that modality is present.
- Padded positions are masked as keys and get the speaker padding index, so they never
  change valid outputs. Attention uses ``scaled_dot_product_attention`` (same maths as
  the code's PreSumm attention: q/sqrt(d_head), masked softmax, dropout on the weights).
- The per-block input dropout is applied separately in each block, as in the code
  (each of the code's encoders adds positions and applies its own dropout).
- No checkpoint selection here; the code picks its best epoch on the test set, which the
  trainer must not copy (select on dev).
"""

from __future__ import annotations

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


@dataclass
class SDTConfig(FusionConfig):
    """SDT hyper-parameters; defaults follow the paper (d_ff None means d_ff = hidden)."""

    hidden: int = 1024
    n_heads: int = 8
    d_ff: int | None = None
    dropout: float = 0.5
    temperature: float = 1.0
    identity_gate: bool = False

    @property
    def ffn_dim(self) -> int:
        return self.hidden if self.d_ff is None else self.d_ff


# Very small variant for tests and smoke runs.
TINY: dict[str, Any] = {"hidden": 32, "n_heads": 4, "dropout": 0.1}


class Block(nn.Module):
    """Single-layer transformer block of the official code (PreSumm style).

    out = dropout(attn(q = x_q, k = v = x_kv)) + x_q
    out = out + dropout(W2(dropout(gelu(W1(LN(out))))))
    """

    def __init__(self, hidden: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        assert hidden % n_heads == 0, "hidden must be divisible by n_heads"
        self.n_heads, self.p = n_heads, dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.w1, self.w2 = nn.Linear(hidden, d_ff), nn.Linear(d_ff, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_q: Tensor, x_kv: Tensor | None, kv_valid: Tensor) -> Tensor:
        """x_q (B, N, H) queries; x_kv (B, N, H) keys/values, None for self-attention;
        kv_valid (B, N) bool, keys that may be attended. Returns (B, N, H)."""
        x_q = self.drop(x_q)
        x_kv = x_q if x_kv is None else self.drop(x_kv)
        p = self.p if self.training else 0.0
        ctx = masked_attention(
            self.query(x_q), self.key(x_kv), self.value(x_kv), key_padding_bias(kv_valid), self.n_heads, p
        )
        ctx = self.out(ctx)
        # No valid key at all (source absent in the whole conversation): zero context.
        ctx = ctx * kv_valid.any(-1)[:, None, None].to(ctx.dtype)
        out = self.drop(ctx) + x_q
        return out + self.drop(self.w2(self.drop(F.gelu(self.w1(self.norm(out))))))


class UnimodalGate(nn.Module):
    """h -> sigmoid(W h) * h, W (H x H, no bias); identity=True fixes W = I (MELD code)."""

    def __init__(self, hidden: int, identity: bool) -> None:
        super().__init__()
        self.fc = None if identity else nn.Linear(hidden, hidden, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        """h (..., H) -> (..., H)."""
        return torch.sigmoid(h if self.fc is None else self.fc(h)) * h


class MultimodalGate(nn.Module):
    """Softmax over present modalities of W h_m (per feature); weighted sum of h_m."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden, bias=False)

    def forward(self, h: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, N, M, H), present (B, N, M) bool -> fused (B, N, H), weights (B, N, M, H).

        Utterances with no modality present (padding) fall back to all modalities."""
        ok = present | ~present.any(-1, keepdim=True)
        scores = self.fc(h).masked_fill(~ok.unsqueeze(-1), float("-inf"))
        weights = scores.softmax(dim=-2)
        return (weights * h).sum(dim=-2), weights


@register_model("sdt")
class SDT(FusionModel):
    """SDT for the modalities in ``config.input_dims``; see the module docstring.

    forward(batch) -> ModelOutput with logits (B, N, C) fused, and aux:
      "branch_logits": modality -> (B, N, C), "present": modality -> (B, N) bool,
      "gate": (B, N, M, H) multimodal gate weights (0 for absent modalities).
    """

    config_class = SDTConfig
    config: SDTConfig

    def __init__(self, config: SDTConfig) -> None:
        super().__init__(config)
        h, mods, c = config.hidden, self.modalities, config.n_classes
        self.speaker = nn.Embedding(config.n_speakers + 1, h, padding_idx=config.n_speakers)
        self.proj = nn.ModuleDict({m: nn.Conv1d(config.input_dims[m], h, kernel_size=1, bias=False) for m in mods})
        pairs = [f"{m}_{n}" for m in mods for n in mods]  # "{target}_{source}"
        self.blocks = nn.ModuleDict({k: Block(h, config.n_heads, config.ffn_dim, config.dropout) for k in pairs})
        self.gates = nn.ModuleDict({k: UnimodalGate(h, config.identity_gate) for k in pairs})
        self.reduce = nn.ModuleDict({m: nn.Linear(len(mods) * h, h) for m in mods})
        self.fusion = MultimodalGate(h)
        self.heads = nn.ModuleDict(
            {m: nn.Sequential(nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(h, c)) for m in mods}
        )
        self.head = nn.Linear(h, c)

    def embed(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Projected tokens + positions + speakers (B, N, H), and presence (B, N) per modality."""
        n = batch.size[1]
        spk = batch.speakers.masked_fill(~batch.mask, self.config.n_speakers)
        base = sinusoidal_positions(n, self.config.hidden, batch.mask.device) + self.speaker(spk)
        tokens, present = {}, {}
        for m in self.modalities:
            x, present[m] = batch.modality(m)
            tokens[m] = self.proj[m](x.transpose(1, 2)).transpose(1, 2) + base
        return tokens, present

    def forward(self, batch: Batch) -> ModelOutput:
        tokens, present = self.embed(batch)
        hidden = {}
        for m in self.modalities:
            outs = []
            for n in self.modalities:
                x_kv = None if n == m else tokens[n]
                out = self.blocks[f"{m}_{n}"](tokens[m], x_kv, present[n])
                outs.append(self.gates[f"{m}_{n}"](out))
            hidden[m] = self.reduce[m](torch.cat(outs, dim=-1))
        stacked = torch.stack([hidden[m] for m in self.modalities], dim=-2)
        mask = torch.stack([present[m] for m in self.modalities], dim=-1)
        fused, weights = self.fusion(stacked, mask)
        branch = {m: self.heads[m](hidden[m]) for m in self.modalities}
        aux = {"branch_logits": branch, "present": present, "gate": weights}
        return ModelOutput(self.head(fused), aux)

    def compute_loss(self, out: ModelOutput, batch: Batch, class_weights: Tensor | None = None) -> LossOutput:
        """CE(fused) + sum_m [CE(z_m) + KL(softmax(z_fused/T) || softmax(z_m/T))].

        Per-modality terms only over utterances where m is present; the KL is summed
        over classes and averaged over those utterances (labelled or not)."""
        assert batch.labels is not None, "compute_loss needs labels"
        t = self.config.temperature
        total = masked_ce(out.logits, batch.labels, class_weights)
        parts = {"ce_fused": float(total.detach())}
        teacher = F.log_softmax(out.logits / t, dim=-1)
        for m, logits in out.aux["branch_logits"].items():
            present = out.aux["present"][m]
            ce = masked_ce(logits, batch.labels.masked_fill(~present, IGNORE_INDEX), class_weights)
            student = F.log_softmax(logits / t, dim=-1)
            kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
            kl = kl[present].sum() / present.sum().clamp(min=1)
            total = total + ce + kl
            parts[f"ce_{m}"], parts[f"kl_{m}"] = float(ce.detach()), float(kl.detach())
        parts["total"] = float(total.detach())
        return LossOutput(total, parts)
