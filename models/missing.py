"""Missing-modality samplers (GCNet protocol, as used by ITEACH-Net).

Each modality of each utterance is dropped with probability ``rate``, keeping at
least one of the utterance's available modalities. Strategies: fixed rate; random
rate per batch in [0, max]; progressive (+step every ``every`` epochs up to max).
Any architecture can be trained with any sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.common import MODALITIES, Batch


def drop_modalities(
    available: torch.Tensor, modalities: tuple[str, ...], rate: float, generator: torch.Generator
) -> torch.Tensor:
    """available (B, N, M) bool -> present (B, N, M) with each of ``modalities`` dropped
    with probability ``rate``; an utterance that would lose all its available
    modalities keeps one of them, chosen uniformly."""
    if rate <= 0:
        return available.clone()
    cols = torch.tensor([MODALITIES.index(m) for m in modalities])
    avail = available[..., cols]
    keep = (torch.rand(avail.shape, generator=generator) >= rate) & avail
    lost_all = avail.any(-1) & ~keep.any(-1)
    if bool(lost_all.any()):
        # Random score on available modalities only; the best one is restored.
        score = torch.rand(avail.shape, generator=generator).masked_fill(~avail, -1.0)
        restore = torch.nn.functional.one_hot(score.argmax(-1), len(cols)).bool()
        keep |= restore & lost_all.unsqueeze(-1)
    present = available.clone()
    present[..., cols] = keep
    return present


@dataclass
class MissingSampler:
    """strategy: "none", "fixed", "random" or "progressive"."""

    strategy: str = "none"
    rate: float = 0.0
    max_rate: float = 0.7
    step: float = 0.1
    every: int = 10

    def __post_init__(self) -> None:
        if self.strategy not in ("none", "fixed", "random", "progressive"):
            raise ValueError(f"unknown missing strategy {self.strategy!r}")
        if not 0.0 <= self.rate < 1.0 or not 0.0 <= self.max_rate < 1.0:
            raise ValueError("missing rates must be in [0, 1)")

    def rate_for(self, epoch: int, generator: torch.Generator) -> float:
        """The rate for one batch of ``epoch`` (0-based)."""
        if self.strategy == "none":
            return 0.0
        if self.strategy == "fixed":
            return self.rate
        if self.strategy == "random":
            return float(torch.rand((), generator=generator)) * self.max_rate
        return min(self.max_rate, self.step * (epoch // self.every))

    def apply(self, batch: Batch, modalities: tuple[str, ...], epoch: int, generator: torch.Generator) -> Batch:
        rate = self.rate_for(epoch, generator)
        if rate <= 0:
            return batch
        assert batch.available is not None
        return batch.with_present(drop_modalities(batch.available, modalities, rate, generator))

    @classmethod
    def parse(cls, text: str) -> MissingSampler:
        """ "none", "fixed:0.3", "random" / "random:0.7", "progressive" / "progressive:0.1:10"."""
        name, *args = text.split(":")
        values = [float(a) for a in args]
        if name == "fixed":
            return cls("fixed", rate=values[0] if values else 0.3)
        if name == "random":
            return cls("random", max_rate=values[0] if values else 0.7)
        if name == "progressive":
            step = values[0] if values else 0.1
            every = int(values[1]) if len(values) > 1 else 10
            return cls("progressive", step=step, every=every)
        return cls(name)

    def describe(self) -> str:
        return {
            "none": "none",
            "fixed": f"fixed:{self.rate}",
            "random": f"random:{self.max_rate}",
            "progressive": f"progressive:{self.step}:{self.every}",
        }[self.strategy]
