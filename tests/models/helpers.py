"""Random and synthetic batches for architecture tests."""

from __future__ import annotations

import importlib

import torch

from models.common import IGNORE_INDEX, MODALITIES, Batch, FusionModel
from models.registry import create_model

DIMS = {"text": 12, "audio": 10, "visual": 8}


def tiny_model(name: str, modalities=MODALITIES, n_classes: int = 3, **overrides) -> FusionModel:
    """The architecture at the small size its module declares in ``TINY``."""
    tiny = dict(importlib.import_module(f"models.{name}").TINY)
    tiny.update(overrides)
    dims = {m: DIMS[m] for m in modalities}
    return create_model(name, input_dims=dims, n_classes=n_classes, n_speakers=4, **tiny)


def random_batch(
    modalities=MODALITIES,
    lengths=(5, 3, 7),
    n_classes: int = 3,
    seed: int = 0,
    missing: float = 0.3,
) -> Batch:
    """Random features, random presence (at least one modality kept), padded."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    feats = {m: torch.randn(b, n, DIMS[m], generator=g) for m in modalities}
    present = torch.zeros(b, n, len(MODALITIES), dtype=torch.bool)
    for m in modalities:
        present[..., MODALITIES.index(m)] = torch.rand(b, n, generator=g) >= missing
    cols = [MODALITIES.index(m) for m in modalities]
    none = ~present[..., cols].any(-1)
    keep = torch.tensor(cols)[torch.randint(len(cols), (b, n), generator=g)]
    present[none, keep[none]] = True
    present &= mask.unsqueeze(-1)
    labels = torch.randint(n_classes, (b, n), generator=g)
    labels[~mask] = IGNORE_INDEX
    speakers = torch.randint(2, (b, n), generator=g) * mask
    return Batch(feats, present, mask, speakers, labels)


def carried_batch(
    carrier: str, modalities=MODALITIES, b: int = 16, n: int = 6, n_classes: int = 3, seed: int = 0
) -> Batch:
    """Labels readable from ``carrier`` only; the other modalities are pure noise."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(n_classes, DIMS[carrier], generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.randint(n_classes, (b, n), generator=g)
    feats = {m: torch.randn(b, n, DIMS[m], generator=g) for m in modalities}
    feats[carrier] = proto[labels] + 0.5 * torch.randn(b, n, DIMS[carrier], generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    present = torch.zeros(b, n, len(MODALITIES), dtype=torch.bool)
    for m in modalities:
        present[..., MODALITIES.index(m)] = True
    speakers = torch.randint(2, (b, n), generator=g)
    return Batch(feats, present, mask, speakers, labels)


def train_steps(model: FusionModel, batch: Batch, steps: int, lr: float = 3e-3) -> float:
    """Run ``steps`` optimizer steps on one batch through every stage; return last loss."""
    loss = float("nan")
    for stage in model.stages:
        model.set_stage(stage)
        opt = torch.optim.Adam(model.param_groups(lr, 0.0))
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            out = model(batch)
            total = model.compute_loss(out, batch).total
            total.backward()
            opt.step()
            loss = float(total.detach())
    model.eval()
    return loss


def accuracy(model: FusionModel, batch: Batch) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(batch).logits.argmax(-1)
    valid = batch.mask & (batch.labels != IGNORE_INDEX)
    return float((pred[valid] == batch.labels[valid]).float().mean())
