"""SDT-specific behaviour: block layout, gates, self-distillation loss."""

from __future__ import annotations

import pytest
import torch

from models.common import IGNORE_INDEX, MODALITIES, ModelOutput
from models.sdt import SDT, SDTConfig
from tests.models.helpers import random_batch, tiny_model


@pytest.mark.parametrize("mods", [("text",), ("text", "audio"), MODALITIES], ids=lambda m: "+".join(m))
def test_block_count(mods: tuple[str, ...]) -> None:
    model = tiny_model("sdt", mods)
    m = len(mods)
    assert len(model.blocks) == m * m  # m intra + m (m - 1) inter
    assert sum(k.split("_")[0] == k.split("_")[1] for k in model.blocks) == m
    assert model.reduce[mods[0]].in_features == m * model.config.hidden


def test_paper_defaults() -> None:
    config = SDTConfig()
    assert (config.hidden, config.n_heads, config.dropout, config.ffn_dim) == (1024, 8, 0.5, 1024)
    assert not config.identity_gate


def test_gate_weights_sum_to_one_over_present() -> None:
    torch.manual_seed(0)
    model = tiny_model("sdt").eval()
    batch = random_batch(seed=1, missing=0.5)
    with torch.no_grad():
        weights = model(batch).aux["gate"]  # (B, N, M, H)
    present = batch.present[batch.mask]  # (V, M)
    w = weights[batch.mask]  # (V, M, H)
    torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))
    assert (w[~present] == 0).all()
    assert (w[present] > 0).all()


def test_absent_modality_does_not_leak() -> None:
    """Features of an absent modality never reach the output."""
    torch.manual_seed(0)
    model = tiny_model("sdt").eval()
    batch = random_batch(seed=2, missing=0.4)
    with torch.no_grad():
        before = model(batch).logits
        for i, m in enumerate(MODALITIES):
            batch.features[m][~batch.present[..., i]] = 1e3
        after = model(batch).logits
    torch.testing.assert_close(before, after)


def test_identity_gate_has_no_unimodal_weights() -> None:
    learned = tiny_model("sdt")
    frozen = tiny_model("sdt", identity_gate=True)
    hidden = learned.config.hidden
    n_params = sum(p.numel() for p in learned.parameters())
    assert n_params - sum(p.numel() for p in frozen.parameters()) == 9 * hidden * hidden
    x = torch.randn(2, hidden)
    torch.testing.assert_close(frozen.gates["text_audio"](x), torch.sigmoid(x) * x)


def test_loss_parts_and_class_weights() -> None:
    torch.manual_seed(0)
    model: SDT = tiny_model("sdt")  # type: ignore[assignment]
    batch = random_batch(seed=3)
    out = model(batch)
    loss = model.compute_loss(out, batch)
    names = {"ce_fused", "total"} | {f"{k}_{m}" for k in ("ce", "kl") for m in MODALITIES}
    assert set(loss.parts) == names
    expected = sum(v for k, v in loss.parts.items() if k != "total")
    assert loss.total.item() == pytest.approx(expected, rel=1e-5)
    assert all(loss.parts[f"kl_{m}"] >= 0 for m in MODALITIES)
    weighted = model.compute_loss(out, batch, class_weights=torch.tensor([1.0, 5.0, 0.1]))
    assert weighted.parts["ce_fused"] != pytest.approx(loss.parts["ce_fused"])


def test_kl_zero_when_branches_equal_and_teacher_gets_gradient() -> None:
    model = tiny_model("sdt")
    batch = random_batch(seed=4)
    fused = torch.randn(3, 7, 3, requires_grad=True)
    branch = {m: fused.detach().clone() for m in MODALITIES}
    present = {m: batch.present[..., i] & batch.mask for i, m in enumerate(MODALITIES)}
    out = ModelOutput(fused, {"branch_logits": branch, "present": present})
    loss = model.compute_loss(out, batch)
    for m in MODALITIES:
        assert loss.parts[f"kl_{m}"] == pytest.approx(0.0, abs=1e-6)
    # No labels, different branches: only the KL terms remain, and they back-propagate
    # into the (undetached) teacher.
    batch.labels.fill_(IGNORE_INDEX)
    out.aux["branch_logits"] = {m: torch.randn(3, 7, 3) for m in MODALITIES}
    model.compute_loss(out, batch).total.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0
