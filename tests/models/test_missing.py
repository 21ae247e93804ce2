import pytest
import torch

from models.common import MODALITIES
from models.missing import MissingSampler, drop_modalities

ALL = torch.ones(64, 50, 3, dtype=torch.bool)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7])
def test_rate_is_honoured_and_one_modality_kept(rate: float) -> None:
    present = drop_modalities(ALL, MODALITIES, rate, torch.Generator().manual_seed(0))
    assert present.any(-1).all()
    dropped = 1 - present.float().mean().item()
    # Restoring one modality when all three were drawn lowers the effective rate a little.
    assert abs(dropped - (rate - rate**3 / 3)) < 0.02


def test_only_available_modalities_survive() -> None:
    avail = ALL.clone()
    avail[..., 2] = False
    present = drop_modalities(avail, MODALITIES, 0.9, torch.Generator().manual_seed(1))
    assert not present[..., 2].any() and present.any(-1).all()


def test_modalities_not_in_model_untouched() -> None:
    present = drop_modalities(ALL, ("text",), 0.9, torch.Generator().manual_seed(2))
    assert present.all()


def test_strategies() -> None:
    g = torch.Generator().manual_seed(0)
    assert MissingSampler.parse("fixed:0.4").rate_for(3, g) == 0.4
    rates = [MissingSampler.parse("random").rate_for(0, g) for _ in range(200)]
    assert min(rates) >= 0 and max(rates) <= 0.7 and max(rates) > 0.6
    prog = MissingSampler.parse("progressive")
    assert [prog.rate_for(e, g) for e in (0, 9, 10, 25, 200)] == pytest.approx([0, 0, 0.1, 0.2, 0.7])
    with pytest.raises(ValueError):
        MissingSampler.parse("sometimes")
