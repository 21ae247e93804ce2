"""Architecture registry, in the style of timm: ``@register_model`` and ``create_model``."""

from __future__ import annotations

from typing import Any

from models.common import FusionConfig, FusionModel

_REGISTRY: dict[str, type[FusionModel]] = {}


def register_model(name: str):
    """Class decorator adding a FusionModel subclass under ``name``."""

    def wrap(cls: type[FusionModel]) -> type[FusionModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        cls.arch_name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_models() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[FusionModel]:
    _import_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(_REGISTRY)}") from None


def make_config(name: str, config: FusionConfig | dict[str, Any] | None = None, **overrides: Any) -> FusionConfig:
    """The architecture's dataclass config: paper defaults, then ``config``, then ``overrides``."""
    cls = model_class(name).config_class
    values = config.to_dict() if isinstance(config, FusionConfig) else dict(config or {})
    values.update(overrides)
    return cls.from_dict(values)


def create_model(name: str, config: FusionConfig | dict[str, Any] | None = None, **overrides: Any) -> FusionModel:
    """Build architecture ``name`` from a config (dataclass or dict) plus overrides."""
    return model_class(name)(make_config(name, config, **overrides))


def _import_builtin() -> None:
    # Importing the modules runs their @register_model decorators.
    from models import dmd, iteach, sdt, summer  # noqa: F401
