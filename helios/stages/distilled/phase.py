"""What a stage-3 phase is (``distill.phase``): its data, its step over the roles, its metrics."""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from helios.config.schema import TrainConfig
from helios.core.history import HistoryLayout
from helios.infra.parallel import RoleSteps
from helios.stages.distilled.roles import DistillModule, DistillRoles
from helios.stages.distilled.rollout import StagedRollout


class DistillPhase(abc.ABC):
    """One phase of Adversarial Hierarchical Distillation: Staged ODE Init or the DMD + GAN post-training."""

    def __init__(
        self,
        cfg: TrainConfig,
        roles: DistillRoles,
        rollout: StagedRollout,
        layout: HistoryLayout,
        device: Callable[[], torch.device],
    ):
        self.cfg, self.d = cfg, cfg.distill
        self.roles, self.rollout, self.layout = roles, rollout, layout
        self._device = device

    @property
    def device(self) -> torch.device:
        """Where the roles compute: the stage's device (set by its setup)."""
        return self._device()

    def setup(self, data_path: Path | None) -> None:  # noqa: B027 (a hook: most phases need nothing)
        """Read what the phase needs besides its dataset."""

    @abc.abstractmethod
    def dataset(self, data_path: Path | None) -> Dataset:
        """The phase's training samples."""

    @abc.abstractmethod
    def step(
        self,
        m: DistillModule,
        batch,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ) -> tuple:
        """One micro-batch's forwards and backwards through ``roles``, each inside its roles' placement
        block (``DistillRoles.resident``): (each trained role's detached loss, metrics)."""

    @abc.abstractmethod
    def metric_names(self) -> list[str]:
        """Every metric key the phase reports (the same on every rank and step)."""
