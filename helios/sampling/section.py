"""Denoise one section (paper §3.3.2, Eq. 8): K pyramid stages driven by diffusers' Helios schedulers.

* K = 1 with ``HeliosScheduler(stages=1)``: the Stage-1 UniPC sampler with CFG;
* K = 3 with ``HeliosScheduler(stages=3)``: Pyramid UniPC, the solver history reset per stage,
  nearest 2x upsample + renoise between stages, CFG-Zero* (Stage 2);
* ``HeliosDMDScheduler``: the few-step distilled sampler (Stage 3).

The order of random draws and the scheduler calls follow diffusers' ``HeliosPipeline`` /
``HeliosPyramidPipeline`` so that the same generator gives the same latents (tested), except the
correlated block noise, which diffusers draws through a Cholesky factor that does not exist at the
default gamma = 1/3 (see :func:`block_noise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.helios.pipeline_helios import calculate_shift

from helios.core.placement import to_device
from helios.core.pyramid import double_nearest, halve

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep, embeds) -> v


def block_noise(
    shape: tuple[int, ...],
    gamma: float,
    generator: torch.Generator | None,
    patch: tuple[int, int] = (2, 2),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Noise correlated inside each ``patch`` with covariance (1+gamma) I - gamma 11^T (PyramidFlow's
    renoise). Drawn as ``z`` [blocks, ph*pw] ~ N(0, I) mapped by the covariance's symmetric square root
    (eigenvalues: 1 + gamma - n*gamma along 1, 1 + gamma across), which exists also where the matrix
    is singular (n*gamma = 1, e.g. gamma = 1/3 for 2x2 blocks) and a Cholesky factor does not."""
    b, c, t, h, w = shape
    ph, pw = patch
    n = ph * pw
    z = torch.randn(
        b * c * t * (h // ph) * (w // pw),
        n,
        generator=generator,
        device=generator.device if generator is not None else device,
    )
    mean = z.mean(dim=1, keepdim=True)
    along = math.sqrt(max(1.0 + gamma - n * gamma, 0.0))
    noise = math.sqrt(1.0 + gamma) * (z - mean) + along * mean
    noise = noise.view(b, c, t, h // ph, w // pw, ph, pw).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)
    return to_device(noise, device) if device is not None else noise


def set_stage_timesteps(
    scheduler,
    steps: list[int],
    stage: int,
    latent_shape: tuple[int, ...],
    patch: tuple[int, int, int] = (1, 2, 2),
    amplify_first: bool = False,
    device: torch.device | None = None,
) -> None:
    """The one timestep / dynamic-shift rule of training and sampling (§5.1): set ``scheduler``'s
    timesteps for pyramid stage ``stage`` of a section whose latents at that stage have ``latent_shape``
    (..., T, h, w); mu comes from that token count (diffusers' ``calculate_shift``, Wan's constants).
    Used by the section sampler, the stage-3 rollout and the ODE-init phase. ``amplify_first``: the
    distilled schedule's doubled steps on a video's first section."""
    from diffusers import HeliosDMDScheduler

    t, h, w = latent_shape[-3:]
    mu = calculate_shift(t * h * w // (patch[0] * patch[1] * patch[2]))
    if len(steps) == 1 and not isinstance(scheduler, HeliosDMDScheduler):  # Stage-1 UniPC
        sigmas = np.linspace(0.999, 0.0, steps[0] + 1)[:-1]
        scheduler.set_timesteps(steps[0], device=device, sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(
            steps[stage], stage, device=device, mu=mu, is_amplify_first_chunk=amplify_first
        )


def renoise_coefficients(start_sigma: float, gamma: float) -> tuple[float, float]:
    """(alpha, beta) of ``x = alpha * Up(x) + beta * block_noise`` at a stage hand-off."""
    ori = 1.0 - start_sigma
    alpha = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - ori) + ori)
    return alpha, alpha * (1.0 - ori) / math.sqrt(gamma)


def upsample_renoise(
    x: torch.Tensor,
    ori_start_sigma: float,
    gamma: float,
    generator: torch.Generator | None,
    patch: tuple[int, int] = (2, 2),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Stage hand-off (§3.3.2): nearest 2x upsample, then ``alpha * x + beta * block_noise``."""
    x = double_nearest(x)
    alpha, beta = renoise_coefficients(ori_start_sigma, gamma)
    noise = block_noise(tuple(x.shape), gamma, generator, patch, device or x.device)
    return alpha * x + beta * noise.to(x.dtype)


def cfg_zero_star_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """s* = <v_c, v_u> / ||v_u||^2 per sample (CFG-Zero*)."""
    b = cond.shape[0]
    c, u = cond.float().reshape(b, -1), uncond.float().reshape(b, -1)
    norm = (u * u).sum(dim=1, keepdim=True)
    s = (c * u).sum(dim=1, keepdim=True) / (
        norm + 1e-8  # pragma: no mutate (a division guard: its sign and size change nothing measurable)
    )
    return s.view(b, *([1] * (cond.dim() - 1)))


@dataclass
class Guidance:
    """Classifier-free guidance. ``cfg_zero_star``: scale the unconditional branch by s* and zero the
    prediction for the first ``zero_steps + 1`` steps of the first stage (``zero_init``)."""

    scale: float = 5.0
    cfg_zero_star: bool = False
    zero_init: bool = True
    zero_steps: int = 1

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, stage: int, step: int) -> torch.Tensor:
        if not self.cfg_zero_star:
            return uncond + self.scale * (cond - uncond)
        s = cfg_zero_star_scale(cond, uncond).to(cond.dtype)
        if stage == 0 and step <= self.zero_steps and self.zero_init:
            return cond * 0.0
        return uncond * s + self.scale * (cond - uncond * s)


class SectionSampler:
    """Run the K-stage schedule of ``scheduler`` on one section.

    ``steps``: steps per stage (length K = ``scheduler.config.stages``). ``amplify_first``: the
    distilled models' doubled step count on the first section. ``shift_after_upsample``: each stage's
    dynamic shift from its own token count, as training and the reference pipeline (which trained the
    released checkpoints) do; ``False``: from the previous stage's, as diffusers' ``HeliosPyramidPipeline``
    does (its port moved the call before the upsample), for parity with it.
    """

    def __init__(
        self,
        scheduler,
        steps: list[int],
        guidance: Guidance,
        patch_size=(1, 2, 2),
        amplify_first: bool = False,
        shift_after_upsample: bool = True,
    ) -> None:
        stages = scheduler.config.stages
        if len(steps) != stages:
            raise ValueError(f"{len(steps)} step counts for a {stages}-stage scheduler")
        self.scheduler, self.steps, self.guidance = scheduler, list(steps), guidance
        self.patch = patch_size
        self.amplify_first = amplify_first
        self.shift_after_upsample = shift_after_upsample
        from diffusers import HeliosDMDScheduler

        self.is_dmd = isinstance(scheduler, HeliosDMDScheduler)

    @property
    def num_stages(self) -> int:
        return len(self.steps)

    def initial_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Full-resolution noise, bilinearly halved (x2) per extra stage (as the pyramid pipeline)."""
        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        for _ in range(self.num_stages - 1):
            x = halve(x) * 2
        return x

    def _set_timesteps(self, stage: int, x: torch.Tensor, device, first_section: bool) -> None:
        amplify = self.amplify_first and first_section
        set_stage_timesteps(self.scheduler, self.steps, stage, x.shape, self.patch, amplify, device)

    def stage_timesteps(
        self, stage: int, shape: tuple[int, ...], first_section: bool = False
    ) -> torch.Tensor:
        """The timesteps this sampler feeds the model in pyramid stage ``stage`` of a section whose latents
        there have ``shape`` (as float; the model gets them rounded down)."""
        like = torch.empty(shape, device="meta")  # pragma: no mutate (only its shape is read)
        self._set_timesteps(stage, like, None, first_section)
        return self.scheduler.timesteps.float().cpu().clone()

    @torch.no_grad()
    def __call__(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        generator: torch.Generator | None,
        first_section: bool = False,
        record: list | None = None,
        trajectory: list | None = None,
    ) -> torch.Tensor:
        """``x``: the output of :meth:`initial_noise`. Returns the clean section latents.
        ``record`` (a list) receives ``(stage, start_state, end_state)`` per pyramid stage; ``trajectory``
        receives ``(stage, timesteps [n], states [n + 1])`` per stage: the state before each step and after
        the last, on the CPU (the teacher's ODE trajectory, for Staged ODE Init)."""
        device = x.device
        starts = [x] if self.is_dmd else None
        for stage in range(self.num_stages):
            if stage == 0 or not self.shift_after_upsample:
                self._set_timesteps(stage, x, device, first_section)
            if stage > 0:
                gamma = self.scheduler.config.gamma
                x = upsample_renoise(
                    x, self.scheduler.ori_start_sigmas[stage], gamma, generator, self.patch[1:], device
                )
                if starts is not None:
                    starts.append(x)
                if self.shift_after_upsample:
                    self._set_timesteps(stage, x, device, first_section)
            timesteps = self.scheduler.timesteps
            stage_start = x
            states = [] if trajectory is not None else None
            for i, t in enumerate(timesteps):
                if states is not None:
                    states.append(x.detach().float().cpu())
                timestep = t.expand(x.shape[0])
                if self.num_stages > 1 or self.is_dmd:
                    timestep = timestep.to(torch.int64)
                v = model_fn(x, timestep, cond)
                if uncond is not None and self.guidance.enabled:
                    v = self.guidance.combine(v, model_fn(x, timestep, uncond), stage, i)
                extra = {}
                if self.is_dmd:
                    extra = {
                        "cur_sampling_step": i,
                        "dmd_noisy_tensor": starts[stage],
                        "dmd_sigmas": self.scheduler.sigmas,
                        "dmd_timesteps": self.scheduler.timesteps,
                        "all_timesteps": timesteps,
                    }
                x = self.scheduler.step(v, t, x, generator=generator, return_dict=False, **extra)[0]
            if record is not None:
                record.append((stage, stage_start.detach().clone(), x.detach().clone()))
            if states is not None:
                states.append(x.detach().float().cpu())
                trajectory.append((stage, timesteps.float().cpu().clone(), states))
        return x
