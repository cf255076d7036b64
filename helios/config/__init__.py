"""Structured configuration: schema dataclasses, Hydra composition and start-up validation."""

from helios.config.load import CONFIG_DIR, compose, load_config, normalize_overrides, to_yaml
from helios.config.schema import (
    ConfigError,
    CorruptConfig,
    FlowConfig,
    HistoryConfig,
    ModelConfig,
    ShiftConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "CorruptConfig",
    "FlowConfig",
    "HistoryConfig",
    "ModelConfig",
    "ShiftConfig",
    "TaskConfig",
    "TrainConfig",
    "compose",
    "load_config",
    "normalize_overrides",
    "to_yaml",
]
