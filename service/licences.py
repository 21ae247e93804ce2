"""Terms that a bundle inherits from the corpora it was trained on, shown where the bundle is served.

A bundle's manifest names its training data (``dataset.name``; several datasets joined by ``+``, as
``merc train --data A --data B`` writes it). Corpora whose terms bind the weights are listed here; a
bundle trained on any of them says so in ``GET /v1/models`` (``licence``, ``non_commercial``). The voice
readings carry the same texts in their own manifests (service/features/voice_training.py).

No imports: the API image (no torch, no numpy needed) reads it.
"""

from __future__ import annotations

from typing import Any

CORPUS_TERMS: dict[str, tuple[str, bool]] = {
    "ravdess8": ("RAVDESS (Livingstone and Russo, PLoS ONE 2018): CC BY-NC-SA 4.0, so NON-COMMERCIAL use only", True),
    "emodb7": ("Emo-DB (Burkhardt et al., Interspeech 2005, TU Berlin): free for research use", False),
}
"""Dataset name (a ``-noisy`` copy counts as its source) -> (terms, whether they forbid commercial use)."""


def training_corpora(manifest: dict[str, Any]) -> list[str]:
    """The dataset names a bundle was trained on, from ``dataset.name`` (``meld7+ravdess8`` -> two)."""
    name = str((manifest.get("dataset") or {}).get("name") or "")
    return [part for part in name.split("+") if part]


def bundle_terms(manifest: dict[str, Any]) -> dict[str, Any]:
    """``{"licence": str | None, "non_commercial": bool}`` inherited from the bundle's training corpora."""
    terms = [CORPUS_TERMS[c.removesuffix("-noisy")] for c in training_corpora(manifest)
             if c.removesuffix("-noisy") in CORPUS_TERMS]  # fmt: skip
    if not terms:
        return {"licence": None, "non_commercial": False}
    text = "; ".join(dict.fromkeys(t for t, _ in terms))
    non_commercial = any(nc for _, nc in terms)
    if non_commercial:
        text = f"Trained on data for non-commercial use: the weights are NON-COMMERCIAL. {text}"
    return {"licence": text, "non_commercial": non_commercial}
