"""Terms that weights inherit from the corpora they were trained on, shown where they are served.

One table for every artefact: a bundle's manifest names its training data (``dataset.name``; several
datasets joined by ``+``, as ``merc train --data A --data B`` writes it) and ``GET /v1/models`` shows
:func:`bundle_terms` (``licence``, ``non_commercial``); the voice readings write the same texts into
their manifests (service/features/voice_training.py).

No imports: the API image (no torch, no numpy needed) reads it.
"""

from __future__ import annotations

from typing import Any

CORPUS_LICENCES: dict[str, str] = {
    "ravdess8": "RAVDESS (Livingstone and Russo, PLoS ONE 2018): CC BY-NC-SA 4.0",
    "emodb7": "Emo-DB (Burkhardt et al., Interspeech 2005, TU Berlin): free for research use",
}
"""Dataset name -> the terms its data comes under."""
NON_COMMERCIAL = frozenset({"ravdess8"})
"""Corpora whose terms forbid commercial use of weights trained on them."""
NOISY = "-noisy"
"""A corpus named NAME-noisy is NAME's media degraded by scripts/augment_speech.py (noise, gain, MP3)."""


def source_corpus(name: str) -> str:
    """The corpus a dataset's data comes from: a degraded copy's source (``ravdess8-noisy`` -> ``ravdess8``)."""
    return name.removesuffix(NOISY)


def training_corpora(manifest: dict[str, Any]) -> list[str]:
    """The dataset names a bundle was trained on, from ``dataset.name`` (``meld7+ravdess8`` -> two)."""
    name = str((manifest.get("dataset") or {}).get("name") or "")
    return [part for part in name.split("+") if part]


def bundle_terms(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"licence": str | None, "non_commercial": bool}`` inherited from the bundle's training corpora."""
    sources = [s for s in dict.fromkeys(map(source_corpus, training_corpora(manifest))) if s in CORPUS_LICENCES]
    if not sources:
        return {"licence": None, "non_commercial": False}
    text = "; ".join(CORPUS_LICENCES[s] for s in sources)
    non_commercial = any(s in NON_COMMERCIAL for s in sources)
    if non_commercial:
        text = f"Trained on data for non-commercial use: the weights are NON-COMMERCIAL. {text}"
    return {"licence": text, "non_commercial": non_commercial}
