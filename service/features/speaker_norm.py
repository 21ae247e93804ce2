"""Per-speaker z-normalisation of utterance vectors within a conversation, shrunk towards training statistics.

A speaker's voice (pitch range, loudness, timbre) shifts every acoustic functional; emotion is what
moves *around* that speaker's own level. So each vector is standardised by the mean and standard
deviation of its speaker's utterances in the same conversation. A speaker with one or two
utterances has no usable statistics of their own: the estimates are shrunk towards the global
training statistics with ``shrink`` pseudo-utterances (a normal-normal posterior mean)::

    mu_s  = (n * mean_s + k * mu_g) / (n + k)
    var_s = (n * var_s  + k * var_g) / (n + k)
    z     = (x - mu_s) / sqrt(var_s)

With one utterance ``z`` is close to global standardisation (and never the all-zero vector that
plain per-speaker normalisation would make of it); with many, it approaches per-speaker z-scores.
Features with zero variance in training are set to 0.

Pure NumPy; must not import torch or the service layers above features/.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NORM_FILE = "speaker_norm.safetensors"
"""Where a bundle keeps the statistics of its ``feature_spec[m]["normalise"]`` entry."""


@dataclass
class SpeakerNormaliser:
    """Global training statistics (D,) and the shrinkage strength ``shrink`` (pseudo-utterances)."""

    mean: np.ndarray
    std: np.ndarray
    shrink: float = 4.0

    @classmethod
    def fit(cls, vectors: Sequence[np.ndarray], shrink: float = 4.0) -> SpeakerNormaliser:
        """Statistics of (D,) training vectors (raw, as the extractor makes them)."""
        x = np.stack([np.asarray(v, np.float64) for v in vectors])
        return cls(x.mean(axis=0), x.std(axis=0), float(shrink))

    def apply(self, vectors: Sequence[np.ndarray | None], speakers: Sequence[str]) -> list[np.ndarray | None]:
        """Normalise one conversation's vectors (None = absent, kept None) by speaker; float32 (D,) each."""
        if len(vectors) != len(speakers):
            raise ValueError(f"{len(vectors)} vectors but {len(speakers)} speakers")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (v, s) in enumerate(zip(vectors, speakers, strict=True)):
            if v is not None:
                groups[str(s)].append(i)
        out: list[np.ndarray | None] = [None] * len(vectors)
        live = self.std > 0
        g_var = np.square(self.std)
        for rows in groups.values():
            x = np.stack([np.asarray(vectors[i], np.float64) for i in rows])  # (n, D)
            n, k = len(rows), self.shrink
            mu = (n * x.mean(axis=0) + k * self.mean) / (n + k)
            var = (n * x.var(axis=0) + k * g_var) / (n + k)
            sd = np.sqrt(np.maximum(var, 1e-6 * g_var))
            z = np.where(live, (x - mu) / np.where(live, sd, 1.0), 0.0)
            for i, row in zip(rows, z, strict=True):
                out[i] = row.astype(np.float32)
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        """What :func:`save` writes: float64 mean and std (openSMILE functionals span 1e-6 .. 1e4 with
        small spreads; float32 would lose the digits the z-scores are made of)."""
        return {"mean": self.mean.astype(np.float64), "std": self.std.astype(np.float64)}

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file(self.tensors(), str(path), metadata={"shrink": str(self.shrink)})

    @classmethod
    def load(cls, path: str | Path, shrink: float | None = None) -> SpeakerNormaliser:
        """Statistics saved by :meth:`save`; ``shrink`` from the file unless given."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            mean, std = f.get_tensor("mean"), f.get_tensor("std")
            stored = float((f.metadata() or {}).get("shrink", 4.0))
        return cls(mean.astype(np.float64), std.astype(np.float64), stored if shrink is None else float(shrink))


def speaker_normalised(
    features: dict[str, list[np.ndarray | None]],
    speakers: Sequence[str],
    normalisers: dict[str, SpeakerNormaliser],
) -> dict[str, list[np.ndarray | None]]:
    """A copy of one conversation's ``features`` with each modality of ``normalisers`` normalised."""
    out = dict(features)
    for m, norm in normalisers.items():
        if m in out and out[m] is not None:
            out[m] = norm.apply(out[m], speakers)
    return out


def bundle_normalisers(spec: dict[str, dict], bundle_dir: str | Path) -> dict[str, SpeakerNormaliser]:
    """The normalisers a bundle's feature spec asks for (``{"normalise": {"by": "speaker", ...}}``)."""
    out = {}
    for m, entry in spec.items():
        norm = entry.get("normalise")
        if not norm:
            continue
        if norm.get("by") != "speaker":
            raise ValueError(f"feature_spec.{m}.normalise: unknown kind {norm!r} (expected by=speaker)")
        out[m] = SpeakerNormaliser.load(Path(bundle_dir) / norm.get("file", f"{m}_{NORM_FILE}"), norm.get("shrink"))
    return out


_CACHE: dict[str, dict[str, SpeakerNormaliser]] = {}


def cached_bundle_normalisers(spec: dict[str, dict], bundle_dir: str | Path) -> dict[str, SpeakerNormaliser]:
    """:func:`bundle_normalisers`, read once per process per bundle folder."""
    key = str(Path(bundle_dir).resolve())
    if key not in _CACHE:
        _CACHE[key] = bundle_normalisers(spec, bundle_dir)
    return _CACHE[key]
