"""The generator's few-step sampling inside training: the DMD schedule of each pyramid stage and the Staged
Backward Simulation (paper §3.4, Eq. 10)."""

from __future__ import annotations

import torch
from torch import nn

from helios.config.schema import TrainConfig
from helios.core.placement import to_device
from helios.core.pyramid import halve
from helios.sampling.section import set_stage_timesteps, upsample_renoise


def velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The transformer's velocity prediction in fp32."""
    return model(
        hidden_states=x,
        timestep=t,
        **cond,
        return_dict=False,  # pragma: no mutate (diffusers' output object indexes as the tuple does)
    )[0].float()


def first_section(history: torch.Tensor) -> bool:
    """Every sample's history is empty (T2V): the section is a video's first."""
    return not bool(history.abs().amax() > 0)


class StagedRollout:
    """G's pyramid rollout with ``distill.steps`` DMD steps per stage, by the sampler's own schedule."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.steps = list(cfg.distill.steps)
        self._scheduler = None

    @property
    def scheduler(self):
        if self._scheduler is None:
            from diffusers import HeliosDMDScheduler

            k = len(self.steps)
            self._scheduler = HeliosDMDScheduler(
                stages=k,
                stage_range=[i / k for i in range(k + 1)],
                gamma=self.cfg.pyramid.gamma,
                use_dynamic_shifting=True,
                time_shift_type=self.cfg.flow.shift.type,
            )
        return self._scheduler

    def stage_schedule(self, k: int, shape, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage k's DMD timesteps and sigmas, by the sampler's own rule (shift from this stage's token
        count; doubled steps on a video's first section when validation samples that way)."""
        sched = self.scheduler
        amplify = first and self.cfg.validation.sampler.amplify_first
        set_stage_timesteps(sched, self.steps, k, shape, amplify_first=amplify)
        # the model sees integer timesteps, as in the sampler (and diffusers' pipelines)
        return sched.timesteps.to(torch.int64).float(), sched.sigmas.float().clone()

    def exit_steps(self, shared: torch.Generator, first: bool) -> list[int]:
        """One exit step per pyramid stage: a uniform draw of the rank-shared generator, scaled to this
        rank's schedule (its first-section schedule is twice as long; as the reference, each rank decides
        that for its own micro-batch)."""
        counts = [len(self.stage_schedule(k, (1, 1, 1, 2, 2), first)[0]) for k in range(len(self.steps))]
        draws = torch.rand(len(counts), generator=shared)
        return [min(int(u * n), n - 1) for u, n in zip(draws.tolist(), counts)]

    def __call__(
        self,
        generator: nn.Module,
        cond: dict,
        shape,
        gen: torch.Generator,
        grad: bool,
        exits: list[int] | None = None,
        first_section: bool = False,
        forwards: list[int] | None = None,
    ) -> torch.Tensor:
        """Staged Backward Simulation (Eq. 10), as the reference code that trained the released models:
        each pyramid stage k runs its DMD steps up to its exit step ``exits[k]`` (all steps when ``exits``
        is None), ``x0^k = x_t - sigma v`` at the exit initialises stage k+1 (nearest 2x + renoise). Only
        exit steps run with gradient and the hand-offs keep the graph, so the DMD/GAN gradient reaches
        stage k whenever stage k+1 exits at its first step ("through K stages"); the steps before an exit
        are simulated without gradient. ``forwards[k]``: the forward passes stage k makes on every rank
        (ZeRO-3: each forward gathers the weights collectively); a rank whose own schedule needs fewer makes
        up the difference with forwards whose output it discards. Returns the full-resolution x0."""
        b, c, t, h, w = shape
        device = cond["encoder_hidden_states"].device
        k_max = len(self.steps)
        x = torch.randn(b, c, t, h, w, generator=gen)
        x = x.to(device, non_blocking=True)  # pragma: no mutate (a copy hint; one device on a CPU)
        for _ in range(k_max - 1):
            x = halve(x) * 2
        sched = self.scheduler
        x0 = x
        for k in range(k_max):
            if k > 0:
                x = upsample_renoise(x0, sched.ori_start_sigmas[k], self.cfg.pyramid.gamma, gen)
            start = x
            timesteps, sigmas = self.stage_schedule(k, x.shape, first_section)
            last = len(timesteps) - 1 if exits is None else exits[k]
            if forwards is not None:
                with torch.no_grad():
                    for _ in range(forwards[k] - (last + 1)):
                        t0 = timesteps[0].expand(b).to(device, non_blocking=True)  # pragma: no mutate
                        velocity(generator, x, t0, cond)
            for j in range(last + 1):
                exiting = j == last
                with torch.set_grad_enabled(grad and exiting):
                    v = velocity(generator, x, to_device(timesteps[j].expand(b), device), cond)
                x0 = x - float(sigmas[j]) * v
                if not exiting:
                    nxt = float(sigmas[j + 1])
                    x = (nxt * start + (1 - nxt) * x0).detach()
        return x0
