"""SUMMER-specific behaviour: stages, frozen teacher, sparse gating, DynAttn masking, losses."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.common import MODALITIES
from models.summer import BiGRUExperts, DynAttention, sparse_gate
from tests.models.helpers import random_batch, tiny_model


def _step(model, batch) -> None:
    opt = torch.optim.Adam(model.param_groups(1e-2, 0.0))
    model.train()
    opt.zero_grad()
    model.compute_loss(model(batch), batch).total.backward()
    opt.step()


def test_teacher_frozen_in_student_stage() -> None:
    torch.manual_seed(0)
    model, batch = tiny_model("summer"), random_batch(seed=1)
    model.set_stage("student")
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    grouped = {id(p) for g in model.param_groups(1e-3, 0.0) for p in g["params"]}
    assert grouped == {id(p) for p in model.student.parameters()}
    _step(model, batch)
    assert model.training and not model.teacher.training
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], atol=0, rtol=0)
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())


def test_teacher_stage_trains_only_the_teacher() -> None:
    torch.manual_seed(0)
    model, batch = tiny_model("summer"), random_batch(seed=1)
    model.set_stage("teacher")
    grouped = {id(p) for g in model.param_groups(1e-3, 0.0) for p in g["params"]}
    assert grouped == {id(p) for p in model.teacher.parameters()}
    model.eval()
    out = model(batch)
    torch.testing.assert_close(out.logits, out.aux["teacher_logits"])
    assert "teacher_ce" in model.compute_loss(out, batch).parts
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    _step(model, batch)
    assert all(torch.equal(v, before[k]) for k, v in model.student.state_dict().items())


def test_sparse_gate_drops_outliers() -> None:
    logits = torch.tensor([[0.0, 0.1, -0.1, 0.05, 0.0, -0.05, 0.02, 9.0]])  # one outlier expert
    weights, keep = sparse_gate(logits, torch.tensor(0.5), alpha=2.0, noise=False)
    assert keep.tolist() == [[True] * 7 + [False]]
    assert weights[0, -1] == 0 and torch.allclose(weights.sum(-1), torch.ones(1))
    # Equal logits: nothing is an outlier, uniform weights.
    weights, keep = sparse_gate(torch.zeros(2, 4), torch.tensor(0.5), alpha=2.0, noise=False)
    assert keep.all() and torch.allclose(weights, torch.full((2, 4), 0.25))


def test_gates_are_distributions_noisy_in_training_only() -> None:
    torch.manual_seed(0)
    model, batch = tiny_model("summer", n_experts=4), random_batch(seed=2)
    model.eval()
    a, b = model(batch).aux, model(batch).aux
    for m in MODALITIES:
        gates = a[f"gate_{m}"]
        assert gates.shape == (3, 7, 4) and (gates >= 0).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(3, 7))
        torch.testing.assert_close(gates, b[f"gate_{m}"], atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(batch).aux["gate_text"], a["gate_text"])


def test_grouped_experts_equal_packed_gru() -> None:
    torch.manual_seed(0)
    experts = BiGRUExperts(2, 2, 5, 4)  # 2 streams x 2 experts
    x, lengths = torch.randn(2, 6, 2, 5), torch.tensor([6, 3])
    out = experts(x, torch.arange(6)[None] < lengths[:, None])
    assert out.shape == (2, 6, 2, 2, 8)
    for s, e in itertools.product(range(2), range(2)):
        gru = nn.GRU(5, 4, batch_first=True, bidirectional=True)
        with torch.no_grad():
            for j, sfx in enumerate(("", "_reverse")):
                getattr(gru, f"weight_ih_l0{sfx}").copy_(experts.w_ih[s, e, j].T)
                getattr(gru, f"weight_hh_l0{sfx}").copy_(experts.w_hh[s, e, j].T)
                getattr(gru, f"bias_ih_l0{sfx}").copy_(experts.b_ih[s, e, j, 0])
                getattr(gru, f"bias_hh_l0{sfx}").copy_(experts.b_hh[s, e, j, 0])
            packed = pack_padded_sequence(x[:, :, s], lengths, batch_first=True, enforce_sorted=False)
            ref = pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=6)[0]
        torch.testing.assert_close(out[:, :, s, e], ref, atol=1e-5, rtol=1e-5)


def test_dynattn_masks_absent_keys_and_empty_rows() -> None:
    torch.manual_seed(0)
    attn = DynAttention(8, 2, threshold=0.5, phi=0.5)
    q, kv = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    valid = torch.tensor([[True, False, True, False], [False] * 4])
    out, _ = attn(q, kv, valid)
    kv2 = kv.clone()
    kv2[~valid] = 1e3
    torch.testing.assert_close(attn(q, kv2, valid)[0], out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], attn.o.bias.expand(4, 8))  # no key -> zero attention


def test_dynattn_teacher_guidance_damps_disagreeing_scores() -> None:
    torch.manual_seed(0)
    attn = DynAttention(8, 2, threshold=0.5, phi=0.5)
    q, kv, valid = torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    plain, scores = attn(q, kv, valid)
    agree, _ = attn(q, kv, valid, teacher_scores=scores)
    torch.testing.assert_close(agree, plain)
    far, _ = attn(q, kv, valid, teacher_scores=scores + 10.0)  # every score disagrees -> x (1 - phi)
    torch.testing.assert_close(far - attn.o.bias, 0.5 * (plain - attn.o.bias))


def test_router_ignores_absent_modalities() -> None:
    torch.manual_seed(0)
    model, batch = tiny_model("summer").eval(), random_batch(seed=3)
    router = model(batch).aux["router"]
    present = batch.present & batch.mask.unsqueeze(-1)
    valid = batch.mask
    assert (router[valid][~present[valid]] == 0).all()
    torch.testing.assert_close(router[valid].sum(-1), torch.ones(int(valid.sum())))


def test_student_loss_is_weighted_sum_of_parts() -> None:
    torch.manual_seed(0)
    model, batch = tiny_model("summer", k1=0.3, k2=0.2, k3=0.1, k4=1.5), random_batch(seed=4)
    model.set_stage("student")
    loss = model.compute_loss(model(batch), batch)
    p = loss.parts
    assert set(p) == {"cross", "align", "inner", "smooth"} and all(v >= 0 for v in p.values())
    expected = 0.3 * p["cross"] + 0.2 * p["align"] + 0.1 * p["inner"] + 1.5 * p["smooth"]
    assert abs(float(loss.total.detach()) - expected) < 1e-5
    text_only = tiny_model("summer", ("text",))  # text-only student degenerates gracefully
    text_only.set_stage("student")
    assert torch.isfinite(text_only.compute_loss(text_only(batch), batch).total)
