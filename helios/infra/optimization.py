"""The optimiser of every trained role: AdamW and diffusers' learning-rate schedule (``optim``; Table 1:
constant LR, gradient clipping 1.0), the schedule spanning ``trainer.max_steps``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from helios.config.schema import OptimConfig


@dataclass(frozen=True)
class Optimization:
    optim: OptimConfig
    max_steps: int

    @property
    def clip(self) -> float:
        """The gradient norm each role is clipped to (``optim.grad_clip``; 0: no clipping)."""
        return self.optim.grad_clip

    def adamw_arguments(self) -> dict[str, Any]:
        o = self.optim
        return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}

    def adamw(self, params: list, lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, **{**self.adamw_arguments(), "lr": lr})

    def scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            self.optim.schedule,
            optimizer,
            num_warmup_steps=self.optim.warmup_steps,
            num_training_steps=max(1, self.max_steps),
        )
