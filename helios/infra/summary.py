"""The run's summary printed at start-up: model size, data, batch, tokens, parallel layout, memory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helios.config.schema import TrainConfig
from helios.core.history import HistoryLayout
from helios.model import count_parameters


def run_summary(
    cfg: TrainConfig,
    run_dir: Path,
    model: nn.Module,
    clips: int,
    latent_hw: tuple[int, int],
    world_size: int,
    grad_accum: int,
    device: torch.device,
    dtype: torch.dtype,
    parallel: str,
) -> str:
    total, trainable = count_parameters(model)
    t = cfg.trainer
    layout = HistoryLayout.from_config(cfg.history)
    per_step = t.batch_size * world_size * grad_accum
    tokens = layout.tokens(*latent_hw)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    state_bytes = trainable * 4 * 4  # trainable fp32 weights + fp32 grads + two AdamW moments
    tuning = f"LoRA r={cfg.model.lora.rank}" if cfg.model.lora.enabled else "full fine-tune"
    return (
        f"Helios stage {cfg.stage} ({cfg.phase}) | run dir {run_dir}\n"
        f"  model {cfg.model.name}: {total / 1e6:.2f}M params, {trainable / 1e6:.3f}M trainable ({tuning})\n"
        f"  data: {clips} clips of {layout.clip_frames} latent frames "
        f"(history {list(cfg.history.sizes)} + window {layout.window}, {cfg.data.latent_format} format)\n"
        f"  batch: {t.batch_size} x {world_size} ranks x {grad_accum} accum = {per_step} clips/step "
        f"| device {device} | {str(dtype).replace('torch.', '')} | {t.max_steps} steps\n"
        f"  tokens per clip: {tokens['noisy']} noisy + {tokens['history']} history; per step "
        f"{per_step * (tokens['noisy'] + tokens['history']):,}\n"
        f"  parallel: {parallel} over {world_size} rank(s) | memory per rank "
        f"(weights + grads + AdamW, activations excluded): {(frozen_bytes + state_bytes) / 2**30:.2f} GiB"
    )
