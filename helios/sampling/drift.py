"""Drift statistics (paper Figure 6) and Adaptive Sampling (§3.5, Eq. 17-19)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helios.config.schema import CorruptConfig
from helios.core.corrupt import frame_aware_corrupt


def saturation(video: torch.Tensor) -> torch.Tensor:
    """HSV saturation per pixel of [B, 3, T, H, W] in [-1, 1]: (max - min) / max of the RGB values shifted to
    be non-negative (a ratio: the scale of the shift's result does not change it)."""
    rgb = video.float() + 1.0
    mx, mn = rgb.max(dim=1).values, rgb.min(dim=1).values
    return torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))


def section_stats(video: torch.Tensor) -> dict[str, float]:
    """Mean saturation, RGB mean and std of decoded frames [B, 3, T, H, W] in [-1, 1]."""
    rgb = (video.float() + 1.0) / 2.0
    stats = {"saturation": float(saturation(video).mean())}
    for i, ch in enumerate("rgb"):
        stats[f"{ch}_mean"] = float(rgb[:, i].mean())
        stats[f"{ch}_std"] = float(rgb[:, i].std())
    return stats


def drift_report(per_section: list[dict[str, float]]) -> dict:
    """Per-section statistics and their change from the first section (what drifting looks like)."""
    if not per_section:
        return {"sections": [], "max_abs_delta": {}}
    first = per_section[0]
    rows = [{**s, **{f"delta_{k}": s[k] - first[k] for k in first}} for s in per_section]
    return {"sections": rows, "max_abs_delta": {k: max(abs(r[f"delta_{k}"]) for r in rows) for k in first}}


@dataclass
class AdaptiveConfig:
    """Adaptive anti-drifting: EMA (rho) of per-channel latent mean/variance of each section; a section
    whose statistics leave the EMA by more than both thresholds is treated as drifting, and its frames
    in the history are Frame-Aware-Corrupted when the next section is generated."""

    enabled: bool = False
    rho_mu: float = 0.9
    rho_sigma: float = 0.9
    delta_mu: float = 0.15
    delta_sigma: float = 0.15
    corrupt: CorruptConfig = field(
        default_factory=lambda: CorruptConfig(
            mode="paper", p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.1, 0.1]
        )
    )


class AdaptiveAntiDrift:
    def __init__(self, cfg: AdaptiveConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)  # its own stream: sampling noise is unchanged
        self.mu: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.events: list[int] = []

    def observe(self, section: int, latents: torch.Tensor) -> bool:
        """Update the EMA with a section's latents [B, C, T, h, w]; True when it drifts (Eq. 19)."""
        mu_t = latents.float().mean(dim=(0, 2, 3, 4))
        var_t = latents.float().var(dim=(0, 2, 3, 4))
        if self.mu is None:
            self.mu, self.var = mu_t, var_t
            return False
        c = self.cfg
        self.mu = c.rho_mu * self.mu + (1 - c.rho_mu) * mu_t
        self.var = c.rho_sigma * self.var + (1 - c.rho_sigma) * var_t
        drift = bool(
            torch.linalg.norm(mu_t - self.mu) > c.delta_mu
            and torch.linalg.norm(var_t - self.var) > c.delta_sigma
        )
        if drift:
            self.events.append(section)
        return drift

    def corrupt(self, history: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Corrupt the history frames [B, C, H, h, w] selected by the bool mask ``frames`` [H]."""
        valid = frames.view(1, -1).expand(history.shape[0], -1).clone()
        out, _, _ = frame_aware_corrupt(history.cpu(), valid, self.cfg.corrupt, self.generator)
        return out.to(history.device, history.dtype)  # pragma: no mutate (placement: one device on a CPU)
