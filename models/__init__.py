"""Pure-PyTorch fusion models for multimodal emotion recognition in conversations."""

from models.common import MODALITIES, Batch, FusionConfig, FusionModel, LossOutput, ModelOutput
from models.registry import create_model, list_models, register_model

__all__ = [
    "MODALITIES",
    "Batch",
    "FusionConfig",
    "FusionModel",
    "LossOutput",
    "ModelOutput",
    "create_model",
    "list_models",
    "register_model",
]
