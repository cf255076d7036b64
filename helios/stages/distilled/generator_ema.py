"""The EMA of the few-step generator (paper §3.4, Table 2: decay with the reference's warm-up), sharded over
ranks (``distill.ema_sharded``), written into the generator in place while validation samples it."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from helios.config.schema import DistillConfig
from helios.core.distillation import EmaSchedule
from helios.infra.ema import ShardedEma
from helios.stages.distilled.roles import DistillModule


def trainable_generator_params(model: DistillModule) -> dict[str, torch.Tensor]:
    """What the EMA averages: the generator's trainable parameters, named as in the checkpoint."""
    return {f"generator.{n}": p for n, p in model.generator.named_parameters() if p.requires_grad}


def partitioned(module: nn.Module) -> bool:
    """ZeRO-3 holds the module's parameters partitioned across ranks."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def with_ema(generator: nn.Module, ema: dict[str, torch.Tensor] | None) -> nn.Module:
    """The generator, or with ``ema`` (export, generate) a copy holding the EMA weights."""
    if not ema or partitioned(generator):
        return generator
    generator = copy.deepcopy(generator)
    params = dict(generator.named_parameters())
    with torch.no_grad():
        for name, tensor in ema.items():
            key = name.removeprefix("generator.")
            if key in params:
                params[key].copy_(tensor)
    return generator


class GeneratorEma:
    """Starts as a copy of the generator at ``distill.ema_start`` and averages after each generator step."""

    def __init__(self, d: DistillConfig) -> None:
        self.schedule = EmaSchedule(d.ema_decay, d.ema_start)
        self.sharded = d.ema_sharded
        self.rank, self.world_size = 0, 1
        self.average: ShardedEma | None = None
        self.updates = 0  # averaging updates since the first copy (the warm-up's n)
        # the training weights while validation runs (None: nothing swapped in; an empty value writes nothing)
        self._raw: dict[str, torch.Tensor] | None = None  # pragma: no mutate

    def set_ranks(self, rank: int, world_size: int) -> None:
        if self.sharded:
            self.rank, self.world_size = rank, world_size

    def after_optimizer_step(self, model: DistillModule, step: int, stepped: list[str]) -> None:
        if "generator" not in stepped or not self.schedule.active(step):
            return
        params = trainable_generator_params(model)
        if self.average is None:
            self.average = ShardedEma(params, self.rank, self.world_size)
            self.updates = 0
        else:
            self.updates += 1
            self.average.update(params, self.schedule(self.updates))

    def swap_in(self, model: DistillModule) -> None:
        """Collective: the gathered EMA written into the generator on every rank (its trainable weights only;
        the training values kept on the host for :meth:`swap_out`), so validation never copies the
        generator and its 14B base."""
        # gathered where it is written (the trainable weights' device; frozen ones may be offloaded)
        device = next(iter(trainable_generator_params(model).values())).device
        ema = self.average.gather(device=device) if self.average is not None else None
        self._raw = self._write(model, ema) if ema else None

    def swap_out(self, model: DistillModule) -> None:
        if self._raw is not None:
            self._write(model, self._raw)
        self._raw = None

    @staticmethod
    def _write(model: DistillModule, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write ``weights`` into the generator's trainable parameters (a ZeRO-3 generator: gathered,
        collective); returns the values it replaced, on the host."""
        params = {n: p for n, p in trainable_generator_params(model).items() if n in weights}
        gathered = contextlib.nullcontext()
        if partitioned(model.generator):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with gathered:
            old = {n: p.detach().cpu().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[n].to(p.device, p.dtype))
        return old

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: the sharded EMA gathered for the checkpoint, on the main rank (which writes it)."""
        full = self.average.gather(dst=0) if self.average is not None else {}
        return {"ema": full} if full else {}

    def load_tensors(self, model: DistillModule | None, tensors: dict) -> None:
        full = tensors.get("ema")
        if full is None or model is None:
            self.average = None
            return
        self.average = ShardedEma(trainable_generator_params(model), self.rank, self.world_size)
        self.average.load(full)
