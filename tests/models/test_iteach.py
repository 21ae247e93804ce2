"""ITEACH-Net specifics: teacher/student views, router, ECCE, losses, parameter groups."""

from __future__ import annotations

import torch

from models.common import masked_ce
from models.iteach import ITEACHNet, MaxPoolMixer, MLPMixer, range_means
from tests.models.helpers import random_batch, tiny_model


def test_eval_forward_does_not_run_the_teacher() -> None:
    model = tiny_model("iteach").eval()
    calls: list[int] = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    batch = random_batch(seed=1)
    out = model(batch)
    assert calls == [] and "teacher_logits" not in out.aux
    assert set(model.compute_loss(out, batch).parts) == {"ce_student", "total"}
    model.train()
    out = model(batch)
    assert calls == [1] and out.aux["teacher_logits"].shape == out.logits.shape


def test_teacher_sees_the_complete_view() -> None:
    torch.manual_seed(0)
    model = tiny_model("iteach", dropout=0.0).train()
    batch = random_batch(seed=2, missing=0.0)
    masked = batch.with_present(batch.present & (torch.rand(batch.present.shape) > 0.5))
    masked.present[..., 0] |= batch.mask  # keep text so every utterance has a modality
    a, b = model(batch), model(masked)
    torch.testing.assert_close(a.aux["teacher_logits"], b.aux["teacher_logits"])
    for ha, hb in zip(a.aux["teacher_hidden"], b.aux["teacher_hidden"], strict=True):
        torch.testing.assert_close(ha, hb)
    assert not torch.allclose(a.logits[batch.mask], b.logits[batch.mask])


def test_router_weights_sum_to_one() -> None:
    model = tiny_model("iteach").eval()
    routes = model(random_batch(seed=3)).aux["routes"]
    assert len(routes) == model.config.student_layers
    for layer in routes:
        assert set(layer) == set(model.modalities)
        for w in layer.values():
            assert w.shape == (3, 7, len(model.config.mixers)) and (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(3, 7))


def test_param_groups_give_the_router_ten_times_the_lr() -> None:
    model = tiny_model("iteach")
    groups = model.param_groups(5e-4, 0.01)
    assert [g["lr"] for g in groups] == [5e-4, 5e-3]
    router = {id(p) for n, p in model.named_parameters() if ".router." in n}
    assert {id(p) for p in groups[1]["params"]} == router and router
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_distance_loss_does_not_reach_the_teacher() -> None:
    torch.manual_seed(0)
    model = tiny_model("iteach", dropout=0.0, teacher_layers=3, student_layers=4).train()
    batch = random_batch(seed=4)
    out = model(batch)
    loss = model.compute_loss(out, batch)
    assert set(loss.parts) == {"ce_teacher", "ce_student", "dist_1", "dist_2", "dist_3", "total"}
    assert loss.parts["dist_1"] > 0
    teacher = list(model.teacher.parameters())
    full = torch.autograd.grad(loss.total, teacher, retain_graph=True, allow_unused=True)
    ce_only = masked_ce(out.aux["teacher_logits"], batch.labels)
    expected = torch.autograd.grad(ce_only, teacher, allow_unused=True)
    for g, e in zip(full, expected, strict=True):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e)


def test_ecce_range_means_match_the_loop() -> None:
    s = torch.randn(2, 9)
    got = range_means(s, dist=3)
    for i in range(9):
        for j in range(9):
            lo, hi = min(i, j), max(i, j)
            want = s[:, lo : hi + 1].mean(-1) if hi - lo <= 3 else torch.zeros(2)
            torch.testing.assert_close(got[:, i, j], want)


def test_pool_and_mlp_mixers_ignore_absent_neighbours() -> None:
    x = torch.randn(1, 20, 4)
    present = torch.rand(1, 20) > 0.3
    garbage = x.masked_fill(~present.unsqueeze(-1), 1e3)
    mlp = MLPMixer(max_len=8)  # 20 utterances: chunks of 8, 8 and 4
    for mixer in (mlp, MaxPoolMixer(3)):
        torch.testing.assert_close(mixer(x, present, None), mixer(garbage, present, None))
    alone = torch.zeros(1, 3, 4)
    out = MaxPoolMixer(3)(alone, torch.tensor([[True, False, False]]), None)
    assert torch.isfinite(out).all() and (out[0, 2] == 0).all()


def test_default_size_builds_for_text_only_and_trimodal() -> None:
    text = ITEACHNet(ITEACHNet.config_class(input_dims={"text": 384}))
    assert len(text.teacher.layers) == 3 and len(text.student.layers) == 4
    assert not any(layer.cross for layer in text.student.layers)
    tri = ITEACHNet(ITEACHNet.config_class(input_dims={"text": 100, "audio": 73, "visual": 100}))
    assert set(tri.student.layers[0].cross) == {"audio", "visual"}
