"""The parallel backend of a run (``parallel.backend``), one interface for the trainer: how the stage's
roles are wrapped, how a micro-batch's backward and a step's update run, and what a checkpoint holds of
the optimiser. :class:`DdpBackend`: one process or DDP (one wrapper per trainable role when a stage has
several), AdamW (optionally ZeRO-1 sharded); :class:`ZeroBackend`: one DeepSpeed engine per role
(helios/infra/zero.py)."""

from __future__ import annotations

import abc
import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from helios.config.schema import ConfigError, TrainConfig
from helios.infra.distributed import DistInfo, barrier, broadcast_object
from helios.infra.guard import Reading, StepGuard
from helios.infra.parallel import RoleCall, TrainerRoleSteps, wrap_ddp
from helios.infra.zero import RoleEngines, to_universal
from helios.model import load_trainable_state_dict, trainable_state_dict

# (losses and gradient norms read at a step's end, the roles' gradient norms) -> raises on divergence
Check = Callable[[Reading, dict[str, float]], None]


class ParallelBackend(abc.ABC):
    """What the trainer asks of a parallel backend; ``wrapped``: the module given to the stage's step."""

    name: str = ""
    wrapped: nn.Module

    def __init__(self, cfg: TrainConfig, dist: DistInfo, grad_accum: int, guard: StepGuard) -> None:
        self.cfg, self.dist, self.grad_accum, self.guard = cfg, dist, grad_accum, guard

    @property
    def zero3(self) -> bool:
        """Some role is partitioned by ZeRO-3 (its forwards are collectives)."""
        return False

    def layout(self) -> str:
        return self.cfg.parallel.backend

    @abc.abstractmethod
    def micro_step(self, last: bool, verify: Callable[[str], None]) -> tuple[Any, TrainerRoleSteps]:
        """A micro-batch's context (DDP: no all-reduce before the last) and its role steps."""

    @abc.abstractmethod
    def step(self, stop: float, check: Check) -> tuple[dict[str, float], list[str], float, bool]:
        """The update at a step's end: (gradient norm per role, roles stepped, lr, stop requested)."""

    def gathered(self, trainable_only: bool = False):
        """Full weights on every rank for the duration (ZeRO-3; collective); ``trainable_only``: the
        trainable ones only (a checkpoint's: the frozen 14B bases stay partitioned)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def checkpoint_objects(self) -> dict[str, Any]:
        """What the checkpoint's objects hold of the optimiser (collective)."""

    def write_extra(self) -> Callable[[Path], None] | None:
        """Files of the checkpoint besides tensors and objects (the engines' partitioned state)."""
        return None

    @abc.abstractmethod
    def load(self, path: Path, tensors: dict, objects: dict, model: nn.Module, scratch: Path) -> None:
        """Weights and optimiser state of the checkpoint ``path``, written by the same backend on any world
        size (``scratch``: this run's folder for temporary files)."""

    @abc.abstractmethod
    def schedules(self) -> list[tuple[torch.optim.Optimizer, Any, list[str]]]:
        """(optimiser, lr scheduler, the role of each of its param groups)."""

    def learning_rates(self) -> dict[str, float]:
        """Each role's current learning rate (the rate of the coming update)."""
        return {
            role: float(group["lr"])
            for optimizer, _, roles in self.schedules()
            for role, group in zip(roles, optimizer.param_groups)
        }

    def set_learning_rates(self, lrs: dict[str, float]) -> None:
        """After loading optimizer and scheduler state: the configured learning rates (they may change on
        resume, e.g. to continue after a divergence with a lower optim.lr), at the schedule's position."""
        for optimizer, scheduler, roles in self.schedules():
            base = [lrs[r] for r in roles]
            for group, lr in zip(optimizer.param_groups, base):
                group["initial_lr"] = lr
            scheduler.base_lrs = list(base)
            with warnings.catch_warnings():  # get_lr() outside step() warns; here it is what we want
                warnings.simplefilter("ignore")
                current = scheduler.get_lr()
            for group, lr in zip(optimizer.param_groups, current):
                group["lr"] = lr
            scheduler._last_lr = list(current)


def model_tensors(model: nn.Module, random_base: bool) -> dict[str, dict[str, torch.Tensor]]:
    """What a checkpoint holds of the model: its trainable weights, and a random base (it exists nowhere on
    disk: kept, so export and resume never depend on the init seed)."""
    tensors = {"trainable": trainable_state_dict(model)}
    if random_base:
        tensors["base"] = {
            n: p.detach().cpu().contiguous()
            for n, p in model.state_dict().items()
            if n not in tensors["trainable"]
        }
    return tensors


def load_model_tensors(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """A checkpoint's trainable weights (and a random base, which exists nowhere else) into ``model``."""
    if "base" in tensors:
        current = model.state_dict()
        model.load_state_dict({k: v.to(current[k].dtype) for k, v in tensors["base"].items()}, strict=False)
    load_trainable_state_dict(model, tensors["trainable"])


class DdpBackend(ParallelBackend):
    """One process, or DDP: the whole model in one wrapper, or (stage 3) one wrapper per trainable role,
    whose backward all-reduces its gradients; one AdamW over the roles' param groups."""

    name = "ddp"

    def __init__(self, cfg, dist, grad_accum, guard, model, roles, groups, make_scheduler, placed) -> None:
        super().__init__(cfg, dist, grad_accum, guard)
        self.wrapped, self.role_ddp = model, {}
        self.roles = [g["name"] for g in groups]
        if dist.enabled:
            # offloaded frozen weights stay where the stage put them (equal on all ranks)
            ddp = {
                "device": dist.device,
                "find_unused": cfg.parallel.find_unused_parameters,
                "frozen_elsewhere": placed,
                "grad_comm": cfg.parallel.grad_comm,
            }
            if roles is None:
                self.wrapped = wrap_ddp(model, **ddp)
            else:
                self.role_ddp = {name: wrap_ddp(RoleCall(roles[name]), **ddp) for name in self.roles}
        o = cfg.optim
        adamw = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        param_groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
        if dist.enabled and cfg.parallel.shard_optimizer:
            self.optimizer = ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW, **adamw)
        else:
            self.optimizer = torch.optim.AdamW(param_groups, **adamw)
        self.lr_scheduler = make_scheduler(self.optimizer)

    def micro_step(self, last: bool, verify: Callable[[str], None]) -> tuple[Any, TrainerRoleSteps]:
        whole = isinstance(self.wrapped, DistributedDataParallel)
        sync = self.wrapped.no_sync() if whole and not last else contextlib.nullcontext()
        return sync, TrainerRoleSteps(self.role_ddp, None, self.grad_accum, last, self.guard, verify)

    def step(self, stop: float, check: Check) -> tuple[dict[str, float], list[str], float, bool]:
        """Per-role clipping, then one read of the losses, the gradient norms and the stop request (one host
        sync), then one AdamW step over the roles with gradients."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norms = {}
        for name, group in zip(self.roles, self.optimizer.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            if with_grad:  # a role without gradients (TTUR) is not stepped: AdamW skips it
                norms[name] = torch.nn.utils.clip_grad_norm_(with_grad, clip)
        reading = self.guard.read(self.roles, {**norms, "stop": stop})
        role_norms = {name: reading.extra[name] for name in norms}
        try:
            check(reading, role_norms)
        except FloatingPointError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return role_norms, list(norms), lr, reading.extra["stop"] > 0

    def checkpoint_objects(self) -> dict[str, Any]:
        """The whole optimizer state (on the main rank; a sharded optimizer's shards gathered to the main
        rank's host memory): the same format with or without sharding."""
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)
            state = self.optimizer.state_dict() if self.dist.is_main else None
        else:
            state = self.optimizer.state_dict()
        return {"optimizer": state, "lr_scheduler": self.lr_scheduler.state_dict()}

    def load(self, path: Path, tensors: dict, objects: dict, model: nn.Module, scratch: Path) -> None:
        """The whole optimizer state (the same on any world size; ZeRO-1 shards it again as it loads)."""
        if "optimizer" not in objects:
            raise ValueError(
                f"resume={path}: written with parallel=zero*, this run uses parallel=ddp; resume with "
                f"the same backend or init_from={path}"
            )
        load_model_tensors(model, tensors)
        self.optimizer.load_state_dict(objects["optimizer"])
        self.lr_scheduler.load_state_dict(objects["lr_scheduler"])

    def schedules(self) -> list[tuple[torch.optim.Optimizer, Any, list[str]]]:
        return [(self.optimizer, self.lr_scheduler, self.roles)]


class ZeroBackend(ParallelBackend):
    """``parallel=zero2|zero3``: one DeepSpeed engine per role; an engine steps inside the micro-batch
    that completes its accumulation."""

    name = "zero"

    def __init__(
        self, cfg, dist, grad_accum, guard, model, roles, groups, make_scheduler, resident, universal=False
    ) -> None:
        super().__init__(cfg, dist, grad_accum, guard)
        self.universal = universal  # a resume on another world size: the engines load a universal checkpoint
        modules = roles or {"model": model}
        for role in cfg.parallel.roles.chosen():
            if role not in modules:
                raise ConfigError(
                    f"parallel.roles.{role}",
                    f"stage {cfg.stage} ({cfg.phase}) has no role {role!r}; its roles: " + ", ".join(modules),
                )
        self.engines = RoleEngines(cfg, modules, groups, grad_accum, make_scheduler, resident, universal)
        if resident is not None:
            resident(None)
        self.wrapped = model

    @property
    def zero3(self) -> bool:
        return self.engines.any_zero3

    def layout(self) -> str:
        """Each role's ZeRO stage, e.g. ``zero2 (generator zero2, critic zero2, real zero3)``."""
        roles = ", ".join(f"{name} {kind}" for name, kind in self.engines.kind.items())
        return f"{self.cfg.parallel.backend} ({roles})"

    def micro_step(self, last: bool, verify: Callable[[str], None]) -> tuple[Any, TrainerRoleSteps]:
        self.engines.begin_micro_step()  # ZeRO engines accumulate by themselves
        return contextlib.nullcontext(), TrainerRoleSteps(
            {}, self.engines, self.grad_accum, last, self.guard, verify
        )

    def step(self, stop: float, check: Check) -> tuple[dict[str, float], list[str], float, bool]:
        lr = self.engines.lr()
        role_norms, stepped = self.engines.finish_step()
        stop_requested = self.guard.read([], {"stop": stop}).extra["stop"] > 0
        return role_norms, stepped, lr, stop_requested

    def gathered(self, trainable_only: bool = False):
        return self.engines.gathered(trainable_only)

    def checkpoint_objects(self) -> dict[str, Any]:
        return {}

    def write_extra(self) -> Callable[[Path], None] | None:
        return lambda tmp: self.engines.save(tmp / "zero")

    def load(self, path: Path, tensors: dict, objects: dict, model: nn.Module, scratch: Path) -> None:
        if not (path / "zero").is_dir():
            raise ValueError(
                f"resume={path}: written with parallel=ddp, this run uses "
                f"parallel={self.cfg.parallel.backend}; resume with the same backend or init_from={path}"
            )
        if not self.universal:
            self.engines.load(path / "zero")  # weights, partitioned optimiser state, LR scheduler
            return
        # written on another world size: DeepSpeed's universal form of it, converted once (main rank) into a
        # temporary folder that the next save's clean-up also removes if this process dies
        out = scratch / f"{path.name}.tmp-universal-{broadcast_object(os.getpid())}"
        try:
            if self.dist.is_main:
                shutil.rmtree(out, ignore_errors=True)
                to_universal(path / "zero", out)
            barrier()
            self.engines.load(out)
            barrier()
        finally:
            if self.dist.is_main:
                shutil.rmtree(out, ignore_errors=True)

    def schedules(self) -> list[tuple[torch.optim.Optimizer, Any, list[str]]]:
        return [(e.optimizer, e.lr_scheduler, [n]) for n, e in self.engines.engines.items()]


def build_backend(
    cfg: TrainConfig,
    dist: DistInfo,
    grad_accum: int,
    guard: StepGuard,
    model: nn.Module,
    roles: dict[str, nn.Module] | None,
    groups: list[dict],
    resident: Callable[[str | None], None] | None,
    universal: bool = False,
) -> ParallelBackend:
    """The backend of ``parallel.backend`` over the stage's ``roles`` (None: the model is the one role),
    with the optimiser's param ``groups``; ``resident(role)``: the offload pool's placement (stage 3);
    ``universal``: it resumes a checkpoint written on another world size."""
    from diffusers.optimization import get_scheduler

    def make_scheduler(optimizer):
        return get_scheduler(
            cfg.optim.schedule,
            optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=max(1, cfg.trainer.max_steps),
        )

    if cfg.parallel.backend == "ddp":
        return DdpBackend(
            cfg, dist, grad_accum, guard, model, roles, groups, make_scheduler, resident is not None
        )
    return ZeroBackend(
        cfg, dist, grad_accum, guard, model, roles, groups, make_scheduler, resident, universal=universal
    )
