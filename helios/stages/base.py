"""What the trainer asks of a stage: build the trainable model, compute one micro-batch loss."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from helios.config.schema import TrainConfig
from helios.data.dataset import ClipBatch


class Stage(Protocol):
    """A training stage is a small object; the loop (optimiser, parallelism, logging, checkpoints)
    lives in :class:`helios.trainer.Trainer` and is shared by all stages."""

    name: str

    def __init__(self, cfg: TrainConfig) -> None: ...

    def build_model(self) -> torch.nn.Module:
        """The module whose trainable parameters the optimiser updates (before DDP wrapping)."""
        ...

    def compute_loss(
        self, model: torch.nn.Module, batch: ClipBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch and scalar metrics (already detached)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
