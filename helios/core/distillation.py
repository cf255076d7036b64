"""Adversarial Hierarchical Distillation building blocks (paper §3.4, Eq. 10-16, Table 2).

Pure functions and small objects used by the Stage-3 trainer: the DMD gradient, Dynamic Re-noise
(Beta schedule), the GAN objectives with approximate R1, the TTUR schedule and the EMA schedule.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.core.placement import to_device


def dmd_gradient(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching direction, normalised per sample as in DMD:

        grad = (fake_x0 - real_x0) / mean|x0 - real_x0|

    Moving the generator's sample along ``-grad`` moves it from where the fake score puts it toward
    where the real score does."""
    dims = tuple(range(1, x0.dim()))
    scale = (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return (fake_x0 - real_x0) / scale


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * ||x0 - sg(x0 - grad)||^2 (mean): its gradient w.r.t. x0 is ``grad`` / numel."""
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def cfg_x0(
    x_t: torch.Tensor, sigma: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float
) -> torch.Tensor:
    """Real-score x0 with classifier-free guidance: x_t - sigma * (v_u + s (v_c - v_u))."""
    s = sigma.view(-1, *([1] * (x_t.dim() - 1)))
    return x_t - s * (v_uncond + scale * (v_cond - v_uncond))


@dataclass
class RenoiseSchedule:
    """Dynamic Re-noise: tau ~ Beta(a, b) with (a, b) going from (a0, b0) to (1, 1) along a cosine
    over ``anneal_steps`` (early: mass on high noise; later: uniform), then clamped."""

    a0: float = 4.0
    b0: float = 1.5
    anneal_steps: int = 500
    low: float = 0.02
    high: float = 0.98

    def params(self, step: int) -> tuple[float, float]:
        w = 0.5 * (1.0 + math.cos(math.pi * min(step / max(self.anneal_steps, 1), 1.0)))
        return 1.0 + (self.a0 - 1.0) * w, 1.0 + (self.b0 - 1.0) * w

    def sample(self, n: int, step: int, generator: torch.Generator) -> torch.Tensor:
        a, b = self.params(step)
        # Beta via two Gammas drawn from the generator's stream: Beta(a, b) = Ga / (Ga + Gb)
        ga = _gamma(a, n, generator)
        gb = _gamma(b, n, generator)
        return (ga / (ga + gb)).clamp(self.low, self.high)


def _gamma(shape: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Marsaglia-Tsang Gamma(shape, 1) sampler (shape >= 1) on an explicit generator."""
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64)  # pragma: no mutate (returned as float32 either way)
    filled = 0
    while filled < n:
        m = 2 * (n - filled) + 8  # pragma: no mutate (a batch of candidates: any size draws the same law)
        z = torch.randn(m, generator=generator, dtype=torch.float64)
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (
            torch.log(u.clamp_min(1e-300)) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300))
        )
        good = (d * v)[ok][: n - filled]
        out[filled : filled + len(good)] = good
        filled += len(good)
    return out.float()


def gan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss (Eq. 11): softplus(-l_real) + softplus(l_fake)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def gan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Eq. 14): softplus(-l_fake)."""
    return F.softplus(-logits_fake).mean()


def critic_gan_term(loss_d: torch.Tensor, r1: torch.Tensor, w_d: float, r1_lambda: float, weighting: str):
    """The discriminator's share of the fake score's loss (Eq. 16 with Eq. 13): the reference adds the R1
    term outside the w_d weight (``reference``), the paper's equations put it inside (``paper``)."""
    if weighting == "paper":
        return w_d * (loss_d + r1_lambda * r1)
    return w_d * loss_d + r1_lambda * r1


def approx_r1(
    discriminator,
    x_real: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
    d_real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate R1 (Eq. 12, APT): ||D(x) - D(x + sigma eps)||^2, a finite-difference stand-in for
    sigma^2 ||grad_x D||^2 that needs no double backward. ``d_real``: D(x) when the caller has it (the
    GAN loss's real logits: the same value and graph, one discriminator forward fewer)."""
    eps = to_device(torch.randn(x_real.shape, generator=generator), x_real.device, x_real.dtype)
    d_real = discriminator(x_real) if d_real is None else d_real
    return (d_real - discriminator(x_real + sigma * eps)).pow(2).mean()


@dataclass
class TTUR:
    """Two time-scale update rule: the critic (fake score + heads) every iteration, the generator
    every ``generator_every`` iterations (iteration counted from 0)."""

    generator_every: int = 5

    def update_generator(self, iteration: int) -> bool:
        return iteration % self.generator_every == 0


@dataclass
class EmaSchedule:
    """EMA of the generator from iteration ``start`` on, updated on generator steps only: the first update
    copies the weights, the n-th average after it uses decay min((1 + n) / (10 + n), ``decay``), n counting
    EMA updates as the reference's (diffusers-style) EMA warm-up does. Counting iterations instead would
    reach the final decay TTUR times sooner (the generator steps every TTUR-th iteration)."""

    decay: float = 0.99
    start: int = 750

    def active(self, step: int) -> bool:
        return step >= self.start

    def __call__(self, n: int) -> float:
        return min((1.0 + n) / (10.0 + n), self.decay)


@contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters of ``modules`` take no gradient inside the block (the generator's GAN loss flows
    through the fake score and heads to the generator only); their flags are restored after.

    Gradient checkpointing of those modules is off inside the block: a checkpointed forward is recomputed
    during backward, after the flags are back on, and would then save other tensors than it did."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    checkpointed = [
        m for root in modules for m in root.modules() if getattr(m, "gradient_checkpointing", False) is True
    ]
    for p in params:
        p.requires_grad_(False)
    for m in checkpointed:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m in checkpointed:
            m.gradient_checkpointing = True
