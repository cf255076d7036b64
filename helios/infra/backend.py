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

from helios.config.schema import ParallelConfig, TrainConfig
from helios.infra.distributed import DistInfo, barrier, broadcast_object
from helios.infra.guard import Reading, StepGuard
from helios.infra.model_roles import Role, trained_roles
from helios.infra.optimization import Optimization
from helios.infra.parallel import RoleCall, TrainerRoleSteps, wrap_ddp
from helios.infra.zero import RoleEngines, to_universal
from helios.model import load_trainable_state_dict, trainable_state_dict

# (losses and gradient norms read at a step's end, the roles' gradient norms) -> raises on divergence
Check = Callable[[Reading, dict[str, float]], None]


class ParallelBackend(abc.ABC):
    """What the trainer asks of a parallel backend; ``wrapped``: the module given to the stage's step."""

    name: str = ""
    wrapped: nn.Module

    def __init__(self, parallel: ParallelConfig, dist: DistInfo, guard: StepGuard, grad_accum: int) -> None:
        self.parallel, self.dist, self.guard, self.grad_accum = parallel, dist, guard, grad_accum

    @property
    def zero3(self) -> bool:
        """Some role is partitioned by ZeRO-3 (its forwards are collectives)."""
        return False

    def layout(self) -> str:
        return self.parallel.backend

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

    def __init__(
        self,
        parallel: ParallelConfig,
        dist: DistInfo,
        guard: StepGuard,
        grad_accum: int,
        *,
        model: nn.Module,
        roles: list[Role],
        optimization: Optimization,
        placed: bool,
    ) -> None:
        """``placed``: the stage placed the model itself (the offload pool's frozen weights stay where it put
        them, equal on all ranks)."""
        super().__init__(parallel, dist, guard, grad_accum)
        trained = trained_roles(roles)
        self.wrapped, self.role_ddp, self.clip = model, {}, optimization.clip
        self.roles = [r.name for r in trained]
        if dist.enabled:
            ddp = {
                "device": dist.device,
                "find_unused": parallel.find_unused_parameters,
                "frozen_elsewhere": placed,
                "grad_comm": parallel.grad_comm,
            }
            if len(trained) == 1 and trained[0].module is model:  # the whole model is the one role
                self.wrapped = wrap_ddp(model, **ddp)
            else:
                self.role_ddp = {r.name: wrap_ddp(RoleCall(r.module), **ddp) for r in trained}
        param_groups = [{"params": r.params, "lr": r.lr} for r in trained]
        if dist.enabled and parallel.shard_optimizer:
            self.optimizer = ZeroRedundancyOptimizer(
                param_groups, optimizer_class=torch.optim.AdamW, **optimization.adamw_arguments()
            )
        else:
            self.optimizer = torch.optim.AdamW(param_groups, **optimization.adamw_arguments())
        self.lr_scheduler = optimization.scheduler(self.optimizer)

    def micro_step(self, last: bool, verify: Callable[[str], None]) -> tuple[Any, TrainerRoleSteps]:
        whole = isinstance(self.wrapped, DistributedDataParallel)
        sync = self.wrapped.no_sync() if whole and not last else contextlib.nullcontext()
        return sync, TrainerRoleSteps(
            self.roles, self.role_ddp, None, self.grad_accum, last, self.guard, verify
        )

    def step(self, stop: float, check: Check) -> tuple[dict[str, float], list[str], float, bool]:
        """Per-role clipping, then one read of the losses, the gradient norms and the stop request (one host
        sync), then one AdamW step over the roles with gradients."""
        clip = self.clip if self.clip > 0 else math.inf
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
        self,
        parallel: ParallelConfig,
        dist: DistInfo,
        guard: StepGuard,
        grad_accum: int,
        *,
        model: nn.Module,
        roles: list[Role],
        optimization: Optimization,
        micro_batch: int,
        universal: bool = False,
    ) -> None:
        """``micro_batch``: ``trainer.batch_size`` (DeepSpeed's per-GPU micro-batch); ``universal``: a resume
        on another world size (the engines load DeepSpeed's universal form of the checkpoint)."""
        super().__init__(parallel, dist, guard, grad_accum)
        self.universal = universal
        self.roles = [r.name for r in trained_roles(roles)]
        self.engines = RoleEngines(parallel, roles, optimization, grad_accum, micro_batch, universal)
        self.wrapped = model

    @property
    def zero3(self) -> bool:
        return self.engines.any_zero3

    def layout(self) -> str:
        """Each role's ZeRO stage, e.g. ``zero2 (generator zero2, critic zero2, real zero3)``."""
        roles = ", ".join(f"{name} {kind}" for name, kind in self.engines.kind.items())
        return f"{self.parallel.backend} ({roles})"

    def micro_step(self, last: bool, verify: Callable[[str], None]) -> tuple[Any, TrainerRoleSteps]:
        self.engines.begin_micro_step()  # ZeRO engines accumulate by themselves
        return contextlib.nullcontext(), TrainerRoleSteps(
            self.roles, {}, self.engines, self.grad_accum, last, self.guard, verify
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
                f"parallel={self.parallel.backend}; resume with the same backend or init_from={path}"
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
    guard: StepGuard,
    grad_accum: int,
    model: nn.Module,
    roles: list[Role],
    placed: bool,
    universal: bool = False,
) -> ParallelBackend:
    """The backend of ``parallel.backend`` over the stage's ``roles``; ``placed``: the stage placed its model
    itself (the offload pool); ``universal``: it resumes a checkpoint written on another world size."""
    optimization = Optimization(cfg.optim, cfg.trainer.max_steps)
    common = {"model": model, "roles": roles, "optimization": optimization}
    if cfg.parallel.backend == "ddp":
        return DdpBackend(cfg.parallel, dist, guard, grad_accum, **common, placed=placed)
    return ZeroBackend(
        cfg.parallel,
        dist,
        guard,
        grad_accum,
        **common,
        micro_batch=cfg.trainer.batch_size,
        universal=universal,
    )
