"""DeepSpeed ZeRO-2/3, one engine per role (``parallel=zero2|zero3``, per-role ``parallel.roles.*``).

Each trainable role (stages 1-2: ``model``; stage 3: ``generator`` and ``critic`` = fake score + GAN
heads) gets its own engine, optimiser, LR scheduler, gradient clipping and step counter; the frozen real
score is partitioned by a ZeRO-3 engine without optimiser (or replicated under ``zero2``). A role's
engine gets exactly one ``backward`` + ``step`` per micro-batch in which it has a loss, so TTUR and the
per-role step counts hold (the reference code's accelerate wrapper stepped an engine on every backward).

Precision is the trainer's: bf16 autocast with fp32 trainable weights and a bf16 frozen base, so ZeRO
and DDP runs compute the same thing. Engines are called through their modules (ZeRO-3 gathers the
partitioned weights with module hooks), so stages need not know which backend runs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path

import torch

from helios.config.schema import ConfigError, ParallelConfig
from helios.infra.model_roles import Role
from helios.infra.optimization import Optimization

log = logging.getLogger(__name__)
# DeepSpeed still calls the collectives torch renamed; the warning repeats on every step
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")


def deepspeed_config(
    zero_stage: int,
    p: ParallelConfig,
    micro_batch: int,
    grad_accum: int,
    clip: float,
    train: bool,
    universal: bool = False,
) -> dict:
    """The DeepSpeed config of one role's engine (``universal``: it will load a universal checkpoint, the
    world-size independent form of a ZeRO checkpoint)."""
    zero: dict = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": torch.cuda.is_available(),
        "reduce_bucket_size": p.zero_bucket_size,
        "allgather_bucket_size": p.zero_bucket_size,
    }
    if zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": p.zero_bucket_size,
                "stage3_param_persistence_threshold": p.zero3_persistence_threshold,
            }
        )
        if p.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = p.zero_hpz_partition_size
        if p.zero_offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train and p.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip if clip > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }


class RoleEngines:
    """The DeepSpeed engines of a run, by role, with the trainer's optimiser and scheduler settings."""

    def __init__(
        self,
        parallel: ParallelConfig,
        roles: list[Role],
        optimization: Optimization,
        grad_accum: int,
        micro_batch: int,
        universal: bool = False,
    ) -> None:
        """An engine per trained role, built inside the role's ``resident()`` block (the offload pool: its
        frozen base on the device while DeepSpeed moves the module there and broadcasts it), and one
        without optimiser per frozen role that ZeRO-3 partitions. ``universal``: the engines will load a
        universal checkpoint (a resume on another world size)."""
        import deepspeed

        names = [r.name for r in roles]
        for role in parallel.roles.chosen():
            if role not in names:
                raise ConfigError(
                    f"parallel.roles.{role}",
                    f"this stage has no role {role!r}; its roles: " + ", ".join(names),
                )
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # the trainer's group
        hpz, world = parallel.zero_hpz_partition_size, torch.distributed.get_world_size()
        if world % hpz:
            raise ConfigError(
                "parallel.zero_hpz_partition_size", f"is {hpz}, which does not divide the world size {world}"
            )
        self.engines: dict[str, deepspeed.DeepSpeedEngine] = {}
        self.frozen: dict[str, deepspeed.DeepSpeedEngine] = {}
        self.kind = {name: parallel.role_backend(name) for name in names}
        for role in roles:
            if role.trained:
                config = deepspeed_config(
                    int(self.kind[role.name][-1]),
                    parallel,
                    micro_batch,
                    grad_accum,
                    optimization.clip,
                    train=True,
                    universal=universal,
                )
                with role.resident():
                    self.engines[role.name], *_ = deepspeed.initialize(
                        model=role.module,
                        optimizer=optimization.adamw(role.params, role.lr),
                        lr_scheduler=optimization.scheduler,
                        config=config,
                        dist_init_required=False,
                    )
            elif self.kind[role.name] == "zero3":
                config = deepspeed_config(3, parallel, micro_batch, grad_accum, 0.0, train=False)
                self.frozen[role.name], *_ = deepspeed.initialize(
                    model=role.module, config=config, dist_init_required=False
                )
        self._global = {n: e.global_steps for n, e in self.engines.items()}

    @property
    def any_zero3(self) -> bool:
        return "zero3" in self.kind.values()

    def begin_micro_step(self) -> None:
        """What ``engine.forward`` does before a forward pass, for our modules, which are called directly:
        ZeRO-3 counts micro-batches there, and from the second micro-batch of a step on it adds to the
        gradient partitions instead of overwriting them (without it, gradient accumulation keeps only
        the last micro-batch's gradient)."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        for engine in self.engines.values():
            if isinstance(engine.optimizer, ZeROOptimizer):
                engine.optimizer.clear_backward_seen_flag()

    def backward(self, role: str, loss: torch.Tensor) -> None:
        """``role``'s backward (DeepSpeed scales the loss by the accumulation itself)."""
        if role not in self.engines:
            raise KeyError(f"a loss for role {role!r}, which has no engine")
        self.engines[role].backward(loss)

    def step(self, role: str) -> None:
        """``role``'s engine step: applied at the accumulation boundary, counted before it."""
        self.engines[role].step()

    def finish_step(self) -> tuple[dict[str, float], list[str]]:
        """Per-role gradient norms and the roles whose optimiser really stepped this iteration."""
        norms, stepped = {}, []
        for name, engine in self.engines.items():
            if engine.global_steps != self._global[name]:
                stepped.append(name)
                norm = engine.get_global_grad_norm()
                norms[name] = float(norm) if norm is not None and math.isfinite(float(norm)) else 0.0
            self._global[name] = engine.global_steps
        return norms, stepped

    def lr(self) -> float:
        engine = next(iter(self.engines.values()))
        return float(engine.lr_scheduler.get_last_lr()[0])

    @contextlib.contextmanager
    def gathered(self, trainable_only: bool = False):
        """Full parameters on every rank inside the block (ZeRO-3 partitions gathered; collective);
        ``trainable_only``: only the trainable ones (the frozen bases stay partitioned)."""
        import deepspeed

        with contextlib.ExitStack() as stack:
            for name, engine in {**self.engines, **self.frozen}.items():
                if self.kind[name] == "zero3":
                    params = [p for p in engine.module.parameters() if p.requires_grad or not trainable_only]
                    stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            yield

    def save(self, directory: Path) -> None:
        """Collective: each engine's partitioned optimiser state, LR scheduler and trainable weights, marked
        as convertible to a universal checkpoint (a resume on another world size converts it)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        for name, engine in self.engines.items():
            info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
            setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, info)
            engine.save_checkpoint(
                str(directory), tag=name, save_latest=False, exclude_frozen_parameters=True
            )

    def load(self, directory: Path) -> None:
        """Each engine's state from ``directory`` (a checkpoint's ``zero/`` written on this world size, or
        its universal form: :func:`to_universal`, for engines built with ``universal``)."""
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(
                str(directory), tag=name, load_module_strict=False, load_optimizer_states=True
            )
            if path is None:
                raise FileNotFoundError(f"{directory}/{name}: no DeepSpeed state for role {name!r}")
        self._global = {n: e.global_steps for n, e in self.engines.items()}


def to_universal(zero_dir: Path, out: Path) -> None:
    """DeepSpeed's own conversion of every role's ZeRO checkpoint in ``zero_dir`` (partitioned for the world
    size that wrote it) into a universal checkpoint in ``out`` (one file per parameter and optimizer
    moment), which engines of any world size load (``checkpoint.load_universal``)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for role in sorted(p for p in zero_dir.iterdir() if p.is_dir()):
        args = argparse.Namespace(
            input_folder=str(role),
            output_folder=str(out / role.name),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # checkpoints written before the save marked them
        )
        ds_to_universal(args)
