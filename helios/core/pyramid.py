"""Pyramid multi-resolution velocity matching (paper §3.3.2, Eq. 5-7).

K stages of increasing spatial resolution (halved per stage below full). Stage k runs between a
start point and an end point at its scale::

    end_k   = (1 - e_k) x0^k + e_k eps^k                                   (x0^K = x0, e_K = 0)
    start_k = (1 - s_k) Up(Down(x0^k)) + s_k eps^k       (k > 1; k = 1: (1 - s_1) x0^1 + s_1 eps^1)
    x_t^k   = sigma start_k + (1 - sigma) end_k,         target = start_k - end_k   (Eq. 5-6)

with ``x0^k`` the clean latent bilinearly halved down to scale k, ``eps^k`` the same noise halved and
rescaled to unit variance, Up = nearest 2x, and (s_k, e_k) the stage's start/end noise levels *taken
from diffusers' HeliosScheduler* (0.999 / 0.8 / 0.5 and 2/3 / 1/3 / 0 for K = 3, gamma = 1/3: the start
levels include the renoise correction), so training and the Pyramid UniPC sampler agree by
construction. The target sign follows diffusers (noise side minus data side, i.e. minus the paper's
v^k). The model sees ``timestep = t_min_k + sigma (t_max_k - t_min_k)``, the stage's window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


def resize_frames(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Spatial resize of [B, C, T, H, W] frame by frame."""
    b, c, t, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    y = F.interpolate(y, size=size, mode=mode)
    return y.reshape(b, t, c, *size).permute(0, 2, 1, 3, 4)


def halve(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    for _ in range(times):
        x = resize_frames(x, (x.shape[-2] // 2, x.shape[-1] // 2), "bilinear")
    return x


def double_nearest(x: torch.Tensor) -> torch.Tensor:
    return resize_frames(x, (x.shape[-2] * 2, x.shape[-1] * 2), "nearest")


@dataclass
class PyramidSchedule:
    """Stage noise levels and timestep windows, read off a diffusers ``HeliosScheduler``."""

    stages: int = 3
    gamma: float = 1.0 / 3.0

    @cached_property
    def scheduler(self):
        from diffusers import HeliosScheduler

        k = self.stages
        return HeliosScheduler(stages=k, stage_range=[i / k for i in range(k + 1)], gamma=self.gamma)

    def start_sigma(self, k: int) -> float:
        return float(self.scheduler.start_sigmas[k])

    def end_sigma(self, k: int) -> float:
        return float(self.scheduler.end_sigmas[k])

    def window(self, k: int) -> tuple[float, float]:
        """(t_max, t_min) of stage k (0 = lowest resolution)."""
        t = self.scheduler.timesteps_per_stage[k]
        return float(t.max()), float(t.min())

    def timestep(self, k: int, sigma: torch.Tensor) -> torch.Tensor:
        t_max, t_min = self.window(k)
        return t_min + sigma * (t_max - t_min)

    def endpoints(self, x0: torch.Tensor, noise: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(start_k, end_k) at stage k's scale for full-resolution ``x0`` and unit ``noise``."""
        down = self.stages - 1 - k
        x0_k = halve(x0, down)
        eps_k = halve(noise, down) * (2.0**down)
        s, e = self.start_sigma(k), self.end_sigma(k)
        end = (1 - e) * x0_k + e * eps_k
        coarse = double_nearest(halve(x0_k)) if k > 0 else x0_k
        start = (1 - s) * coarse + s * eps_k
        return start, end
