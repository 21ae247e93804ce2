"""DMD-specific behaviour: decoupling, graph distillation units, losses."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.common import MODALITIES
from models.dmd import DMD, DMDConfig, triplet_margin
from models.registry import make_config
from tests.models.helpers import random_batch, tiny_model

SUBSETS = [("text",), ("text", "audio"), MODALITIES]


def test_defaults_are_the_official_mosi_ones() -> None:
    cfg = make_config("dmd")
    assert isinstance(cfg, DMDConfig)
    assert (cfg.d_model, cfg.n_heads, cfg.layers, cfg.mem_layers) == (50, 10, 4, 4)
    assert (cfg.kernel_text, cfg.kernel_audio, cfg.kernel_visual) == (5, 5, 5)
    assert (cfg.w_homo_gd, cfg.w_hetero_gd, cfg.w_decouple, cfg.w_inner) == (0.05, 0.05, 0.1, 0.1)


def test_one_shared_encoder_for_all_modalities() -> None:
    model = tiny_model("dmd").eval()
    assert isinstance(model, DMD)
    assert isinstance(model.shared, torch.nn.Linear)
    assert len(model.private) == len(model.decoder) == 3
    out = model(random_batch(seed=1))
    for m in MODALITIES:
        torch.testing.assert_close(out.aux["shared"][m], model.shared(out.aux["x_tilde"][m]))
    assert model.hetero_dim == 2 * model.config.d_model


def test_edges_are_normalised_over_available_pairs() -> None:
    model = tiny_model("dmd").eval()
    batch = random_batch(seed=2, missing=0.5)
    out = model(batch)
    present = out.aux["present"]
    for gd, edges in ((model.gd_homo, out.aux["edges_homo"]), (model.gd_hetero, out.aux["edges_hetero"])):
        assert len(gd.pairs) == 6 and edges.shape == (3, 7, 6)
        avail = gd.available(present)
        rows = avail.any(-1)
        assert rows.any() and (~rows & batch.mask).any()  # both cases exercised
        torch.testing.assert_close(edges.sum(-1)[rows], torch.ones(int(rows.sum())))
        assert (edges[~avail] == 0).all()
        assert float(gd.prior.sum()) == pytest.approx(1.0)
        favoured = {p for p, w in zip(gd.pairs, gd.prior, strict=True) if w > 0.1}
        assert {("text", "audio"), ("text", "visual")} <= favoured
    hetero_favoured = model.gd_hetero.prior[model.gd_hetero.pairs.index(("visual", "audio"))]
    assert hetero_favoured > model.gd_homo.prior[model.gd_homo.pairs.index(("visual", "audio"))]


@pytest.mark.parametrize("mods", SUBSETS, ids=lambda m: "+".join(m))
def test_loss_parts_present_and_finite(mods: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = tiny_model("dmd", mods)
    batch = random_batch(mods, seed=3)
    loss = model.compute_loss(model(batch), batch)
    expected = {"task", "ce_fused", "ce_homo_fusion", "gd_homo", "gd_hetero", "gd_homo_reg", "gd_hetero_reg"}
    expected |= {"rec", "cyc", "ort", "mar"} | {f"ce_{b}_{m}" for b in ("homo", "hetero") for m in mods}
    assert set(loss.parts) == expected
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.parts.values())
    loss.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if len(mods) == 1:
        assert len(model.cross) == 0 and out_edges(model, batch).shape[-1] == 0
        assert loss.parts["gd_homo"] == loss.parts["gd_hetero"] == 0.0
    else:
        assert len(model.cross) == len(mods) * (len(mods) - 1)
        assert loss.parts["gd_homo"] > 0.0 and loss.parts["mar"] > 0.0


def out_edges(model: DMD, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).aux["edges_homo"]


def test_absent_modality_features_are_ignored() -> None:
    model = tiny_model("dmd").eval()
    batch = random_batch(seed=4, missing=0.4)
    with torch.no_grad():
        ref = model(batch).logits
        for i, m in enumerate(MODALITIES):
            batch.features[m][~batch.present[..., i]] = 50.0
        torch.testing.assert_close(model(batch).logits[batch.mask], ref[batch.mask])


def test_triplet_margin_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(14, 5, generator=g, requires_grad=True)
    groups = torch.randint(3, (14,), generator=g)
    labels = torch.randint(3, (14,), generator=g)
    fast = triplet_margin(feats, groups, labels, 0.3)
    cos = torch.nn.functional.cosine_similarity(feats[:, None], feats[None, :], dim=-1)
    terms = [
        torch.relu(0.3 - cos[i, j] + cos[i, k])
        for i, j, k in itertools.product(range(14), repeat=3)
        if groups[i] != groups[j] and labels[i] == labels[j] and groups[i] == groups[k] and labels[i] != labels[k]
    ]
    slow = torch.stack(terms).mean()
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast, feats)
    (g_slow,) = torch.autograd.grad(slow, feats)
    torch.testing.assert_close(g_fast, g_slow)
    empty = triplet_margin(feats[:2], groups[:2] * 0, labels[:2] * 0, 0.3)
    assert float(empty.detach()) == 0.0
