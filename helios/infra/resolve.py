"""What a training config means on this process: gradient accumulation for the global batch, loader
workers, the compute dtype."""

from __future__ import annotations

import importlib.util

import torch

from helios.config.schema import ConfigError, TrainConfig

# settings that need an optional package: (package, the extra that installs it)
OPTIONAL = {
    "deepspeed": "cluster",
    "wandb": "cluster",
    "triton": "gpu",
}


def check_installed(cfg: TrainConfig) -> None:
    """The packages this run's settings need (the optional extras of ``pyproject.toml``), checked before
    anything is built: a missing one is a config error naming the setting and the install command."""
    needs = []
    if cfg.parallel.backend != "ddp":
        needs.append(("deepspeed", f"parallel={cfg.parallel.backend}"))
    if cfg.logging.wandb:
        needs.append(("wandb", "logging.wandb=true"))
    for name in ("norm", "rope"):
        if getattr(cfg.model.kernels, name) == "triton":
            needs.append(("triton", f"model.kernels.{name}=triton"))
    for package, setting in needs:
        if importlib.util.find_spec(package) is None:
            key = setting.split("=")[0]
            raise ConfigError(
                key,
                f"{setting} needs the {package} package: pip install 'helios-train[{OPTIONAL[package]}]'",
            )


def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """``trainer.global_batch_size`` (when set) = batch_size x world_size x grad_accum, in samples
    (:meth:`TrainConfig.samples_per_clip`: stage 2 with ``pyramid.stage_draw=every`` counts each clip's
    stage-samples, the reference's global batch 192 of 2-post = 1 clip x 3 stages x 64 GPUs)."""
    t = cfg.trainer
    if t.global_batch_size == 0:
        return t.grad_accum
    samples = cfg.samples_per_clip()
    per_step = t.batch_size * world_size * samples
    if t.global_batch_size % per_step:
        per_clip = world_size * samples
        fits = [b for b in range(t.batch_size, 0, -1) if t.global_batch_size % (b * per_clip) == 0]
        lower = t.global_batch_size // per_step * per_step
        options = [f"trainer.batch_size={fits[0]}"] if fits else []
        options += [f"trainer.global_batch_size={g}" for g in (lower, lower + per_step) if g > 0]
        raise ConfigError(
            "trainer.global_batch_size",
            f"{t.global_batch_size} is not a multiple of batch_size x world_size = "
            f"{t.batch_size} x {world_size}"
            + (f" x {samples} stage-samples per clip (pyramid.stage_draw=every)" if samples > 1 else "")
            + "; nearest working settings: "
            + " or ".join(options),
        )
    return t.global_batch_size // per_step


def resolve_num_workers(num_workers: int | None, device: torch.device) -> int:
    """``trainer.num_workers``; unset: 4 loader processes on a GPU (the step must not wait for data),
    none on the CPU (the workers would compete with the step for the same cores)."""
    if num_workers is not None:
        return num_workers
    return 4 if device.type == "cuda" else 0


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``trainer.precision``: bf16, fp32, or auto (bf16 on a GPU)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def out_of_memory(batch_size: int, step: int, ranks_x_accum: int) -> RuntimeError:
    """What to change when a step runs out of device memory at ``trainer.batch_size``: the same global batch
    by accumulation, gradient checkpointing, or a shorter clip."""
    b = batch_size
    return RuntimeError(
        f"out of device memory at step {step} with trainer.batch_size={b}. Try trainer.batch_size=1 "
        f"trainer.global_batch_size={b * ranks_x_accum} (the same global batch by accumulation), "
        "model.transformer.gradient_checkpointing=true, or fewer history/window frames"
    )
