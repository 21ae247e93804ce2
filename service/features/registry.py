"""One registry for the text, audio and visual extractors that bundles name in their feature spec.

A feature-spec entry is ``{"extractor", "version", "dim"}`` (plus ``"options"`` for visual settings
that change the features). :func:`make_spec` builds one from a name; :func:`get_extractor` returns the
loaded extractor for an entry (once per process per name, options and device) and checks that its
version and dimension are the ones the entry records.

Names: text — ``minilm-l6-v2``, ``mpnet-base-v2``, a Hugging Face id or a local path (see
service/features/text.py); audio — ``compare2016``, ``egemaps-v02``; visual — ``mtcnn-pyemotion``,
``mtcnn-r3d18``.
"""

from __future__ import annotations

import threading
from typing import Any

from models.data import DataError
from models.train import resolve_device

# The audio and visual modules (openSMILE, PyAV, facenet/torchvision: ~300 MB resident) are imported
# when an extractor of theirs is first built, so a text-only worker never maps them.
DEFAULTS = {"text": "minilm-l6-v2", "audio": "compare2016", "visual": "mtcnn-pyemotion"}
_EXTRACTORS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def list_extractors() -> dict[str, list[str]]:
    """Registered names per modality (text also takes any local HF model id or path)."""
    from service.features.audio import AUDIO_SETS
    from service.features.visual import VISUAL_EXTRACTORS

    return {"text": ["minilm-l6-v2", "mpnet-base-v2"], "audio": sorted(AUDIO_SETS), "visual": sorted(VISUAL_EXTRACTORS)}


def _build(modality: str, name: str, options: dict[str, Any] | None, device: str):
    if modality == "text":
        from service.features.text import get_text_encoder

        return get_text_encoder(name, device=device)
    if modality == "audio":
        from service.features.audio import OpenSmileExtractor

        return OpenSmileExtractor(name)
    if modality == "visual":
        from service.features.visual import VisualExtractor, VisualOptions

        return VisualExtractor(name, VisualOptions.from_dict(options), resolve_device(device))
    raise DataError(f"unknown modality {modality!r}")


def get_extractor(modality: str, name: str, options: dict[str, Any] | None = None, device: str = "auto"):
    """The loaded extractor (has ``.spec``); built once per process per (modality, name, options, device)."""
    key = (modality, name, tuple(sorted((options or {}).items())), str(resolve_device(device)))
    with _LOCK:
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = _build(modality, name, options, device)
        return _EXTRACTORS[key]


def make_spec(modality: str, name: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The feature-spec entry for an extractor name (loads it once to read its version)."""
    extractor = get_extractor(modality, name or DEFAULTS[modality], options, "cpu")
    entry = extractor.spec.to_dict()
    if modality == "visual":
        entry["options"] = {k: v for k, v in vars(extractor.options).items() if v is not None}
    return entry


def extractor_for(modality: str, entry: dict[str, Any], device: str = "auto"):
    """The extractor a spec entry names; DataError when this host's version or dimension differ.

    A fine-tuned text entry (adapter path made absolute by the Predictor) gives its hash-checked
    :class:`service.features.finetuned.FinetunedTextEncoder`."""
    if modality == "text":
        from service.features.finetuned import get_finetuned_encoder, is_finetuned

        if is_finetuned(entry):
            return get_finetuned_encoder(entry, None, str(resolve_device(device)))
    extractor = get_extractor(modality, entry["extractor"], entry.get("options"), device)
    if extractor.spec.version != entry["version"] or extractor.spec.dim != int(entry["dim"]):
        raise DataError(
            f"{modality} extractor {entry['extractor']!r} here is {extractor.spec.version} ({extractor.spec.dim}-d); "
            f"the bundle expects {entry['version']} ({entry['dim']}-d)"
        )
    return extractor
