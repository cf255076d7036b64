"""A role of the run's model as the trainer and the parallel backend see it (paper §3.4: the generator,
the critic, the frozen real score; stages 1-2: the one ``model``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from torch import nn

from helios.core.distillation import EmaSchedule


@dataclass
class Role:
    """``module``: what one DDP wrapper or ZeRO engine holds; ``params`` and ``lr``: its trainable
    parameters and their learning rate (``lr`` None: a frozen role, e.g. a separate real score, which only a
    ZeRO-3 engine partitions); ``resident()``: the scoped block in which its frozen base is on the device
    (the offload pool, §4.2; without one, always); ``ema``: the schedule of the EMA of its trainable weights,
    if it has one (stage 3's generator, §3.4), kept sharded over ranks with ``ema_sharded``
    (:class:`helios.infra.ema.ModelEma`)."""

    name: str
    module: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)
    lr: float | None = None
    resident: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    ema: EmaSchedule | None = None
    ema_sharded: bool = False

    @property
    def trained(self) -> bool:
        return self.lr is not None


def trained_roles(roles: list[Role]) -> list[Role]:
    return [r for r in roles if r.trained]
