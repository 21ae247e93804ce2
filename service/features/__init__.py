"""Feature extractors that turn raw modalities into fixed-size vectors for the MERC models."""

from service.features.text import (
    EmbeddingCache,
    EncoderUnavailableError,
    FeatureSpec,
    TextEncoder,
    UnknownEncoderError,
    encode_texts,
    get_text_encoder,
    list_text_encoders,
    register_text_encoder,
)

__all__ = [
    "EmbeddingCache",
    "EncoderUnavailableError",
    "FeatureSpec",
    "TextEncoder",
    "UnknownEncoderError",
    "encode_texts",
    "get_text_encoder",
    "list_text_encoders",
    "register_text_encoder",
]
