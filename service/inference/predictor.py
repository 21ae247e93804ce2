"""A loaded bundle that turns one conversation's features into per-utterance distributions.

This is the last stage of media → segments → features → fusion model → distributions,
shared by ``merc predict``, the in-process worker of ``merc serve`` and the Celery workers.
Features come in as produced by the extractors: modality -> one vector (D_m,) or None
(absent) per utterance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import find_bundle, load_bundle, read_manifest
from models.common import MODALITIES
from models.data import Conversation, encode_conversation
from models.ensemble import is_ensemble
from models.train import predict as predict_probs
from models.train import resolve_device

FeatureLists = dict[str, list[np.ndarray | None]]


def fusion_int8_enabled() -> bool:
    """``MERC_FUSION_INT8`` (default on): the fusion model's linear layers int8 on CPU (see Predictor)."""
    return os.environ.get("MERC_FUSION_INT8", "1").lower() in ("1", "true", "yes")


class Predictor:
    """One bundle, loaded once per process (weights on ``device``, eval mode).

    On CPU the fusion model's linear layers run int8 (``models.common.int8_linear``; ``int8`` None:
    ``MERC_FUSION_INT8``, default on): one conversation is a batch of a few dozen rows, so scoring is
    bound by reading the weights (sdt-meld7: 21 turns 21 -> 8 ms). Dev drift of every bundle, measured
    by ``benchmarks/speed_text.py``: docs/benchmarks.md. Training and ``merc evaluate`` stay fp32.

    An ensemble bundle's folder gives an :class:`service.inference.ensemble.EnsemblePredictor` (the
    same interface; its members' distributions averaged)."""

    def __new__(
        cls,
        name_or_path: str | Path,
        device: str = "auto",
        weights_dir: str | Path = "weights",
        int8: bool | None = None,
    ) -> Predictor:
        if cls is Predictor and is_ensemble(read_manifest(find_bundle(name_or_path, weights_dir))):
            from service.inference.ensemble import EnsemblePredictor

            return super().__new__(EnsemblePredictor)
        return super().__new__(cls)

    def __init__(
        self,
        name_or_path: str | Path,
        device: str = "auto",
        weights_dir: str | Path = "weights",
        int8: bool | None = None,
    ) -> None:
        self.path = find_bundle(name_or_path, weights_dir)
        self.device = resolve_device(device)
        self._load(int8)
        self.name: str = self.manifest.get("name", self.path.name)
        self.labels: list[str] = list(self.manifest["labels"])
        from service.features.finetuned import absolute_spec

        self.feature_spec: dict[str, dict[str, Any]] = absolute_spec(self.manifest["feature_spec"], self.path)

    def _load(self, int8: bool | None) -> None:
        """Sets ``model`` (the fusion model), ``manifest``, ``int8`` and ``modalities``."""
        self.model, self.manifest = load_bundle(self.path, self.device)
        self.int8 = self.device.type == "cpu" and (fusion_int8_enabled() if int8 is None else int8)
        if self.int8:
            from models.common import int8_linear

            self.model = int8_linear(self.model).eval()
        self.modalities: list[str] = list(self.model.modalities)

    @property
    def feature_keys(self) -> list[str]:
        """The keys of the features it reads: its modalities (an ensemble's: one per distinct feature)."""
        return list(self.modalities)

    @torch.no_grad()
    def probabilities(self, conv: Conversation, features: FeatureLists) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) float32 probabilities and the (n, M) bool presence actually used.

        Modalities the bundle does not use are ignored; those it uses but that are missing
        from ``features`` count as absent for every utterance. An utterance with no modality
        at all is scored from its context alone (all-zero inputs; ``modalities`` is empty).
        """
        n = len(conv.utterances)
        feats = {m: features.get(m) or [None] * n for m in self.modalities}
        dims = {m: int(self.feature_spec[m]["dim"]) for m in self.modalities}
        unlabelled = replace(conv, utterances=[replace(u, label=None) for u in conv.utterances])  # labels: not inputs
        encoded = encode_conversation(unlabelled, feats, dims, [], self.model.config.n_speakers)
        probs = predict_probs(self.model, [encoded], batch_size=1, device=self.device)[0]
        return probs.astype(np.float32), encoded.present

    def predict(self, conv: Conversation, features: FeatureLists) -> list[dict[str, Any]]:
        """Per utterance: index, id, speaker, start, end, text, emotion, distribution, modalities."""
        probs, present = self.probabilities(conv, features)
        out = []
        for i, (u, p) in enumerate(zip(conv.utterances, probs, strict=True)):
            used = [m for m in MODALITIES if m in self.modalities and present[i, MODALITIES.index(m)]]
            out.append(
                {
                    "index": i,
                    "id": u.id,
                    "speaker": u.speaker,
                    "start": u.start,
                    "end": u.end,
                    "text": u.text,
                    "emotion": self.labels[int(p.argmax())],
                    "distribution": {label: float(v) for label, v in zip(self.labels, p, strict=True)},
                    "modalities": used,
                }
            )
        return out


def unusable_modalities(predictor: Predictor, supplied: Sequence[str]) -> dict[str, str]:
    """For modalities a request supplied that the bundle cannot use: modality -> reason."""
    return {
        m: f"bundle {predictor.name!r} was trained on {'+'.join(predictor.modalities)} and does not use {m}"
        for m in supplied
        if m not in predictor.modalities
    }
