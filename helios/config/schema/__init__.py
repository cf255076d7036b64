"""Typed configuration schema, split by owner.

Every Hydra YAML file under ``configs/`` is merged into :class:`TrainConfig` before anything is
built: unknown keys, wrong types and out-of-range values stop the run at start-up with the key
path in the message (:class:`ConfigError`). Each dataclass validates its own fields next to them
(``_validate``); cross-field rules live in :meth:`TrainConfig.validate` (``root.py``).
"""

from helios.config.schema.base import REFERENCE_NEGATIVE_PROMPT, ConfigError, Validated
from helios.config.schema.commands import (
    ClipConfig,
    ExportConfig,
    FixturesConfig,
    GenerateConfig,
    OdePairsConfig,
    PrepareConfig,
    TinyVaeConfig,
    TinyVaePhase,
)
from helios.config.schema.data import LATENT_FORMATS, DataConfig, SyntheticConfig
from helios.config.schema.history_config import CorruptConfig, HistoryConfig, SaturationConfig, TaskConfig
from helios.config.schema.model import (
    TINY_VAE_BASE_DIM,
    KernelsConfig,
    LoraConfig,
    ModelConfig,
    TextEncoderConfig,
    TransformerConfig,
    VaeConfig,
)
from helios.config.schema.objectives import DistillConfig, FlowConfig, GanConfig, PyramidConfig, ShiftConfig
from helios.config.schema.root import STAGE_NAMES, TrainConfig
from helios.config.schema.sampling import AdaptiveSamplingConfig, SamplerConfig, ValidationConfig
from helios.config.schema.training import (
    DISTILL_ROLES,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    RoleParallelConfig,
    TrainerConfig,
)

__all__ = [
    "DISTILL_ROLES",
    "LATENT_FORMATS",
    "REFERENCE_NEGATIVE_PROMPT",
    "STAGE_NAMES",
    "TINY_VAE_BASE_DIM",
    "AdaptiveSamplingConfig",
    "ClipConfig",
    "ConfigError",
    "CorruptConfig",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "FixturesConfig",
    "FlowConfig",
    "GanConfig",
    "GenerateConfig",
    "HistoryConfig",
    "KernelsConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OdePairsConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrepareConfig",
    "PyramidConfig",
    "RoleParallelConfig",
    "SamplerConfig",
    "SaturationConfig",
    "ShiftConfig",
    "SyntheticConfig",
    "TaskConfig",
    "TextEncoderConfig",
    "TinyVaeConfig",
    "TinyVaePhase",
    "TrainConfig",
    "TrainerConfig",
    "TransformerConfig",
    "VaeConfig",
    "Validated",
    "ValidationConfig",
]
