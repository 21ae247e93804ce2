"""Features for conversation files: inline vectors or extractors named in a feature spec.

A feature spec maps each modality to ``{"extractor", "version", "dim"}``. Version
``"inline"`` means the vectors come with the data (``utterance.features[m]``, e.g.
mosi2's precomputed features); otherwise the named extractor computes them
(text encoders; audio and visual extractors from media, see service/features/registry.py).

``merc extract`` writes audio/visual vectors inline *and* records the real extractor, version and
options in dataset.json; such entries keep their real spec (so bundles trained on them recompute
the same features from media at prediction time) while training reads the stored vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.data import Conversation, DataError, EncodedConversation, encode_conversation, inline_features

INLINE = "inline"


def dataset_feature_spec(
    info: dict[str, Any], modalities: Sequence[str] | None, text_encoder: str | None
) -> dict[str, dict[str, Any]]:
    """The feature spec to train on a dataset folder (its dataset.json as ``info``).

    Modalities default to the inline ones (mosi2) or text. Text uses the inline
    vectors when the data carries them and no ``text_encoder`` is asked for.
    """
    inline = info.get("feature_spec") or {}
    chosen = list(modalities or info.get("modalities_inline") or ["text"])
    spec: dict[str, dict[str, Any]] = {}
    for m in chosen:
        if m == "text" and (text_encoder or m not in inline):
            from service.features.text import get_text_encoder

            spec[m] = get_text_encoder(text_encoder or "minilm-l6-v2").spec.to_dict()
        elif m in inline and inline[m].get("version") not in (None, INLINE):
            spec[m] = dict(inline[m])  # extracted by merc extract: the real extractor spec
        elif m in inline:
            spec[m] = {"extractor": inline[m]["extractor"], "version": INLINE, "dim": int(inline[m]["dim"])}
        else:
            raise DataError(
                f"modality {m!r}: the data carries no inline {m} features and {m} extraction from media "
                "needs the media pipeline (merc extract)"
            )
    return spec


def conversation_features(
    convs: Sequence[Conversation], spec: dict[str, dict[str, Any]], device: str = "auto", progress: bool = True
) -> list[dict[str, list[np.ndarray | None]]]:
    """Per conversation, modality -> one vector or None per utterance, following ``spec``."""
    out: list[dict[str, list[np.ndarray | None]]] = [{} for _ in convs]
    for m, entry in spec.items():
        if entry["version"] == INLINE:
            for i, conv in enumerate(convs):
                out[i][m] = inline_features(conv, m)
        elif m == "text":
            for conv_out, vectors in zip(out, text_vectors(convs, entry, device, progress), strict=True):
                conv_out["text"] = vectors
        elif any(m in u.features for conv in convs for u in conv.utterances):
            for i, conv in enumerate(convs):  # vectors merc extract stored for this spec
                out[i][m] = inline_features(conv, m)
        else:
            raise DataError(
                f"no {m} vectors in the data for extractor {entry['extractor']!r}: "
                "run `merc extract` with the media first"
            )
    return out


def text_vectors(
    convs: Sequence[Conversation],
    entry: dict[str, Any],
    device: str = "auto",
    progress: bool = False,
    first: Sequence[int] | None = None,
    future_known: bool = True,
) -> list[list[np.ndarray | None]]:
    """Text vectors (D,) or None of every utterance of ``convs``, one batched encoder call, split per
    conversation. DataError when this host's encoder differs from ``entry`` (version or dimension).

    A fine-tuned entry (service/features/finetuned.py) encodes each utterance with its context window
    (``future_known`` False: no later turns); ``first[i]`` > 0 leaves utterances before it None (they
    are context only)."""
    from service.features.finetuned import get_finetuned_encoder, is_finetuned

    if is_finetuned(entry):
        from models.train import resolve_device

        ft = get_finetuned_encoder(entry, None, str(resolve_device(device)))
        out = ft.conversation_vectors(convs, future_known=future_known, first=first)
        if entry.get("oof_features"):  # training only: out-of-fold vectors of the train conversations
            stored = np.load(entry["oof_features"])
            for i, conv in enumerate(convs):
                if conv.id in stored.files:
                    rows = stored[conv.id].astype(np.float32)
                    out[i] = [None if np.isnan(r).any() else r for r in rows]
        return out
    from service.features.registry import extractor_for

    encoder = extractor_for("text", entry, device)
    starts = list(first) if first is not None else [0] * len(convs)
    texts = [u.text if j >= starts[i] else None for i, conv in enumerate(convs) for j, u in enumerate(conv.utterances)]
    vectors, present = encoder.encode_with_mask(texts, show_progress=None if progress else False)
    out, k = [], 0
    for conv in convs:
        n = len(conv.utterances)
        out.append([vectors[j] if present[j] else None for j in range(k, k + n)])
        k += n
    return out


def media_absent(spec: dict[str, dict[str, Any]], convs: Sequence[Conversation]) -> list[str]:
    """Modalities of ``spec`` computed from media (audio, visual: not inline) of which ``convs`` carry no vector
    at all, e.g. a text-only test file scored by a text+audio bundle."""
    carried = {m for c in convs for u in c.utterances for m in u.features}
    return [m for m, entry in spec.items() if m != "text" and entry.get("version") != INLINE and m not in carried]


def absent_as_inline(spec: dict[str, dict[str, Any]], convs: Sequence[Conversation]) -> dict[str, dict[str, Any]]:
    """``spec`` with the :func:`media_absent` modalities read as (missing) inline vectors: absent at every
    utterance, as the service treats media without sound, instead of an error asking for ``merc extract``."""
    absent = media_absent(spec, convs)
    return {m: ({**e, "version": INLINE} if m in absent else e) for m, e in spec.items()}


def encode_dataset(
    convs: Sequence[Conversation],
    spec: dict[str, dict[str, Any]],
    labels: Sequence[str],
    n_speakers: int,
    device: str = "auto",
    progress: bool = True,
) -> list[EncodedConversation]:
    """Conversations -> arrays ready for batching, features computed per ``spec``."""
    feats = conversation_features(convs, spec, device, progress)
    dims = {m: int(e["dim"]) for m, e in spec.items()}
    return [encode_conversation(c, f, dims, labels, n_speakers) for c, f in zip(convs, feats, strict=True)]
