"""The voice reading: speech emotion from openSMILE ComParE_2016 functionals of the utterance.

Default artefact ``weights/readings/voice-en7/`` (RAVDESS English + Emo-DB German, MELD's seven labels,
non-commercial: RAVDESS is CC BY-NC-SA 4.0); ``weights/readings/voice-emodb7/`` is the earlier
Emo-DB-only one (its seven Emo-DB labels); ``$MERC_VOICE_READING`` names another folder
(``manifest.json`` + ``model.safetensors``)::

    x (6373,) raw compare2016 functionals of one utterance
    -> per-speaker z-normalisation within the conversation, shrunk towards the training statistics
       (service/features/speaker_norm.py; ``mean``/``std`` (6373,) and ``shrink`` in the artefact),
       clipped to +-``normalisation.clip`` where the manifest has one
    -> the K features ranked highest by ANOVA F on the training speakers (``selected`` (K,))
    -> heads, probabilities averaged: ``linear`` (softmax(W x + b), W (C, K)) and/or ``mlp``
       (softmax(W2 relu(W1 x/s + b1) + b2))

Inference is NumPy only (no scikit-learn at serve time); training (service/features/voice_training.py)
fits scikit-learn models on the vectors ``merc extract`` stored and selects hyperparameters on the dev
speakers' macro recall (UAR), never on test.

Must not import torch or service layers above features/.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.features.speaker_norm import SpeakerNormaliser

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VOICE_MODEL = ROOT / "weights" / "readings" / "voice-en7"
_LOCK = threading.Lock()
_CACHE: dict[str, VoiceReadingModel] = {}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class VoiceReadingModel:
    """A loaded voice reading artefact: normaliser, selected features, heads, manifest."""

    norm: SpeakerNormaliser
    selected: np.ndarray  # (K,) int64 feature indices
    heads: list[dict[str, np.ndarray]]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def feature_entry(self) -> dict[str, Any]:
        """The audio feature-spec entry (extractor, version, dim) its inputs must come from."""
        return dict(self.manifest["feature_spec"]["audio"])

    def scores(self, z: np.ndarray) -> np.ndarray:
        """(N, C) probabilities of (N, D) speaker-normalised vectors."""
        x = z[:, self.selected].astype(np.float64)
        clip = self.manifest.get("normalisation", {}).get("clip")
        if clip is not None:  # artefacts trained on clipped z-scores say so
            x = np.clip(x, -clip, clip)
        probs = []
        for h in self.heads:
            if h["kind"] == "linear":
                probs.append(softmax(x @ h["W"].T + h["b"]))
            else:
                hidden = np.maximum(0.0, (x / h["scale"]) @ h["W1"] + h["b1"])
                probs.append(softmax(hidden @ h["W2"] + h["b2"]))
        return np.mean(probs, axis=0)

    def predict(self, vectors: Sequence[np.ndarray | None], speakers: Sequence[str]) -> list[np.ndarray | None]:
        """Per utterance of one conversation: (C,) probabilities, None where the vector is absent."""
        z = self.norm.apply(vectors, speakers)
        rows = [i for i, v in enumerate(z) if v is not None]
        out: list[np.ndarray | None] = [None] * len(vectors)
        if rows:
            for i, p in zip(rows, self.scores(np.stack([z[i] for i in rows])), strict=True):
                out[i] = p.astype(np.float32)
        return out


def _heads_to_tensors(heads: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    tensors, described = {}, []
    for j, h in enumerate(heads):
        keys = ("W", "b") if h["kind"] == "linear" else ("W1", "b1", "W2", "b2")
        for k in keys:
            dtype = np.float16 if k.startswith("W") else np.float32
            tensors[f"head{j}.{k}"] = np.ascontiguousarray(h[k], dtype)  # safetensors writes the raw buffer
        described.append({"kind": h["kind"], **({"scale": float(h["scale"])} if "scale" in h else {})})
    return tensors, described


def save_voice_model(out: Path, model: VoiceReadingModel) -> None:
    """``model.safetensors`` (weights fp16, statistics fp64) + ``manifest.json`` (with the head list)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors, described = _heads_to_tensors(model.heads)
    tensors.update({f"norm.{k}": v for k, v in model.norm.tensors().items()})
    tensors["selected"] = model.selected.astype(np.int64)
    save_file(tensors, str(out / "model.safetensors"))
    manifest = {**model.manifest, "heads": described}
    manifest["normalisation"] = {**manifest.get("normalisation", {}), "shrink": model.norm.shrink}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load_voice_model(path: str | Path | None = None) -> VoiceReadingModel:
    """The artefact at ``path`` (default ``$MERC_VOICE_READING`` or weights/readings/voice-en7), cached."""
    from safetensors import safe_open

    folder = Path(path or os.environ.get("MERC_VOICE_READING") or DEFAULT_VOICE_MODEL)
    with _LOCK:
        if str(folder) in _CACHE:
            return _CACHE[str(folder)]
        manifest = json.loads((folder / "manifest.json").read_text())
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        norm = SpeakerNormaliser(
            t["norm.mean"].astype(np.float64), t["norm.std"].astype(np.float64), manifest["normalisation"]["shrink"]
        )
        heads = []
        for j, h in enumerate(manifest["heads"]):
            head = {"kind": h["kind"], **{k.split(".", 1)[1]: v.astype(np.float64) for k, v in t.items()
                                          if k.startswith(f"head{j}.")}}  # fmt: skip
            if "scale" in h:
                head["scale"] = float(h["scale"])
            heads.append(head)
        model = VoiceReadingModel(norm, t["selected"].astype(np.int64), heads, manifest)
        _CACHE[str(folder)] = model
        return model
