"""A loaded ensemble bundle (models.ensemble): its members' distributions averaged per utterance.

``Predictor(path)`` returns an :class:`EnsemblePredictor` for an ensemble manifest, so every caller
(``merc predict``, the job runner, ``merc serve``) serves it unchanged. Its ``feature_spec`` holds one
entry per distinct feature the members read (``"text"``, ``"text~1"``, ...: one per text extractor),
which ``service.inference.pipeline.extract_features`` computes; each member then reads its own keys,
applies its own input transform (speaker normalisation) and scores.
"""

from __future__ import annotations

import numpy as np

from models.bundle import read_manifest
from models.common import MODALITIES
from models.data import Conversation
from models.ensemble import mean_probabilities, member_dirs
from service.inference.predictor import FeatureLists, Predictor


class EnsemblePredictor(Predictor):
    """Member :class:`Predictor` objects, and the mean of their probabilities."""

    def _load(self, int8: bool | None) -> None:
        """Sets ``members`` (a Predictor each), ``member_keys`` (per member: modality -> feature key),
        ``manifest``, ``int8`` and ``modalities``; ``model`` is None (no single fusion model)."""
        self.manifest = read_manifest(self.path)
        self.members = [Predictor(d, str(self.device), int8=int8) for d in member_dirs(self.path, self.manifest)]
        self.member_keys: list[dict[str, str]] = [dict(m["features"]) for m in self.manifest["members"]]
        self.model = None  # type: ignore[assignment]
        self.int8 = all(m.int8 for m in self.members)
        self.modalities = list(self.manifest["modalities"])

    @property
    def feature_keys(self) -> list[str]:
        return list(self.feature_spec)

    def probabilities(self, conv: Conversation, features: FeatureLists) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) mean of the members' probabilities and the (n, M) presence any member used.

        ``features``: feature key -> one vector or None per utterance (the ensemble's ``feature_spec``)."""
        from service.inference.pipeline import bundle_inputs

        n = len(conv.utterances)
        probs, present = [], np.zeros((n, len(MODALITIES)), bool)
        for member, keys in zip(self.members, self.member_keys, strict=True):
            own = {m: features.get(key) or [None] * n for m, key in keys.items()}
            p, used = member.probabilities(conv, bundle_inputs(member, conv, own))
            probs.append([p])
            present |= used
        return mean_probabilities(probs)[0], present
