"""Behaviour every fusion architecture must have, run for each registered one."""

from __future__ import annotations

import pytest
import torch

from models.common import MODALITIES, Batch
from models.registry import list_models
from tests.models.helpers import accuracy, carried_batch, random_batch, tiny_model, train_steps

ARCHS = ["sdt", "summer", "dmd", "iteach"]
SUBSETS = [("text",), ("text", "audio"), MODALITIES]


def test_registry_lists_the_four() -> None:
    assert set(ARCHS) <= set(list_models())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mods", SUBSETS, ids=lambda m: "+".join(m))
def test_forward_random_presence(arch: str, mods: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch, mods)
    batch = random_batch(mods, seed=1)
    for training in (True, False):
        model.train(training)
        for stage in model.stages:
            model.set_stage(stage)
            out = model(batch)
            assert out.logits.shape == (3, 7, 3)
            assert torch.isfinite(out.logits[batch.mask]).all()
            loss = model.compute_loss(out, batch)
            assert torch.isfinite(loss.total)
            if training:
                loss.total.backward()


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_presence_on_trimodal_model(arch: str) -> None:
    model = tiny_model(arch).eval()
    batch = random_batch(seed=2)
    batch.present[..., 1:] = False
    out = model(batch)
    assert torch.isfinite(out.logits[batch.mask]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_changes_valid_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch).eval()
    big = random_batch(lengths=(4, 9), seed=3)
    alone = Batch(
        {m: v[:1, :4] for m, v in big.features.items()},
        big.present[:1, :4],
        big.mask[:1, :4],
        big.speakers[:1, :4],
        big.labels[:1, :4],
    )
    # Garbage in the padded positions must not leak into valid ones.
    for v in big.features.values():
        v[0, 4:] = 1e3
    with torch.no_grad():
        a = model(alone).logits[0]
        b = model(big).logits[0, :4]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_tiny_batch(arch: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch)
    batch = random_batch(seed=4, missing=0.0)
    train_steps(model, batch, steps=150)
    assert accuracy(model, batch) >= 0.95


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("carrier", MODALITIES)
def test_learns_label_carried_by_one_modality(arch: str, carrier: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(arch)
    train = carried_batch(carrier, seed=5)
    train_steps(model, train, steps=120)
    held_out = carried_batch(carrier, seed=6)
    assert accuracy(model, held_out) > 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_result(arch: str) -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(7)
        model = tiny_model(arch)
        train_steps(model, random_batch(seed=8), steps=3)
        with torch.no_grad():
            return model(random_batch(seed=9)).logits

    torch.testing.assert_close(run(), run(), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_copy_runs_and_stays_close(arch: str) -> None:
    """models.common.int8_linear (the CPU serving default): every architecture runs quantized, close to fp32."""
    from models.common import int8_linear

    torch.manual_seed(0)
    model = tiny_model(arch).eval()
    batch = random_batch(seed=2)
    quantized = int8_linear(model, min_weights=0).eval()
    assert any("quantized" in type(m).__module__ for m in quantized.modules())
    with torch.no_grad():
        p32 = torch.softmax(model(batch).logits, -1)[batch.mask]
        p8 = torch.softmax(quantized(batch).logits, -1)[batch.mask]
    assert (p32 - p8).abs().max() < 0.05
