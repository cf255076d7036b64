"""Flow matching with v-prediction: timestep sampling and dynamic shifting (paper §5.1).

Convention (diffusers flow schedulers, Wan, Helios): ``x_t = (1 - sigma) * x0 + sigma * noise``,
the model predicts ``v = noise - x0`` and receives ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

import math

import torch

from helios.config.schema import FlowConfig, ShiftConfig

NUM_TRAIN_TIMESTEPS = 1000


def token_count(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of a latent grid after patchification, the sequence length used for shifting."""
    return (frames // patch[0]) * (height // patch[1]) * (width // patch[2])


def shift_mu(seq_len: int, cfg: ShiftConfig) -> float:
    """mu = base_shift + (seq_len - base_seq_len) * (max_shift - base_shift) / (max - base) (unclamped)."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    return cfg.base_shift + (seq_len - cfg.base_seq_len) * slope


def shift_factor(seq_len: int, cfg: ShiftConfig) -> float:
    """Shift s for a sequence length: linear s = mu; exponential s = exp(min(mu, ln exp_cap))."""
    if not cfg.enabled:
        return 1.0
    mu = shift_mu(seq_len, cfg)
    if cfg.type == "linear":
        return mu
    return math.exp(min(mu, math.log(cfg.exp_cap)))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): s > 1 moves mass to high noise."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(n: int, cfg: FlowConfig, generator: torch.Generator) -> torch.Tensor:
    """Un-shifted sigmas in (0, 1): uniform, or logit-normal sigmoid(N(mean, std))."""
    if cfg.timestep_sampling == "uniform":
        return torch.rand(n, generator=generator)
    z = cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator)
    return torch.sigmoid(z)


def flow_pair(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v) on the straight path between data and noise; sigmas has one entry per sample."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    s = s.to(x0.device, x0.dtype, non_blocking=True)  # pragma: no mutate (placement and a copy hint)
    return (1.0 - s) * x0 + s * noise, noise - x0
