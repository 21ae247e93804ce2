"""Padded batches of encoded conversations, and a seeded batch iterator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from models.common import IGNORE_INDEX, MODALITIES, Batch
from models.data import EncodedConversation


def collate(convs: Sequence[EncodedConversation], modalities: Sequence[str]) -> Batch:
    """Pad conversations to the longest one.

    Returns a Batch with features (B, N, D_m) for each of ``modalities``, present
    (B, N, M), mask (B, N), speakers (B, N) and labels (B, N) (IGNORE_INDEX in padding).
    """
    b, n = len(convs), max(len(c) for c in convs)
    mask = torch.zeros(b, n, dtype=torch.bool)
    present = torch.zeros(b, n, len(MODALITIES), dtype=torch.bool)
    speakers = torch.zeros(b, n, dtype=torch.long)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    feats = {m: torch.zeros(b, n, convs[0].features[m].shape[1]) for m in modalities}
    for i, c in enumerate(convs):
        k = len(c)
        mask[i, :k] = True
        present[i, :k] = torch.from_numpy(c.present)
        speakers[i, :k] = torch.from_numpy(c.speakers)
        labels[i, :k] = torch.from_numpy(c.labels)
        for m in modalities:
            feats[m][i, :k] = torch.from_numpy(c.features[m])
    return Batch(feats, present, mask, speakers, labels)


def iterate_batches(
    convs: Sequence[EncodedConversation],
    batch_size: int,
    modalities: Sequence[str],
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` conversations (shuffled with ``rng`` when asked)."""
    order = np.arange(len(convs))
    if shuffle:
        (rng or np.random.default_rng(0)).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([convs[i] for i in order[start : start + batch_size]], modalities)
