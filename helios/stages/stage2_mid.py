"""Stage 2 (Helios-Mid): pyramid velocity matching (paper §3.3.2, Eq. 5-7), history as in Stage 1."""

from __future__ import annotations

import torch

from helios.config.schema import TrainConfig
from helios.core.flow_matching import sample_sigmas, shift_factor, shift_sigmas, token_count
from helios.core.pyramid import PyramidSchedule
from helios.stages.stage import WeightsLoader
from helios.stages.stage1_base import FlowStage, NoisyGroup


class PyramidStage(FlowStage):
    """Each sample trains one pyramid stage k (drawn with ``pyramid.stage_ratios``) on the straight
    path between the stage's start and end points at its resolution; sigma is sampled as in Stage 1
    and shifted by the stage's own token count; samples of one stage share a forward pass. The stage of
    each sample comes from the rank-shared generator, so every rank makes the same forward passes."""

    name = "pyramid"

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        super().__init__(cfg, weights)
        self.schedule = PyramidSchedule(cfg.pyramid.stages, cfg.pyramid.gamma)
        ratios = torch.tensor(cfg.pyramid.stage_ratios, dtype=torch.float64)
        self.probs = ratios / ratios.sum()

    def noisy_groups(
        self, target: torch.Tensor, generator: torch.Generator, shared: torch.Generator
    ) -> tuple[list[NoisyGroup], dict]:
        k_max = self.schedule.stages
        h, w = target.shape[-2:]
        factor = 2 ** (k_max - 1) * 2  # halvings x the 2x2 patch
        if h % factor or w % factor:
            raise ValueError(
                f"latent size {h}x{w} is not divisible by {factor}: {k_max} pyramid stages need it "
                "(choose the resolution or pyramid.stages accordingly)"
            )
        b = target.shape[0]
        # the same stage pattern on every rank: one forward per stage present, equal counts under ZeRO-3
        stage_of = torch.multinomial(self.probs, b, replacement=True, generator=shared)
        noise = torch.randn(target.shape, generator=generator)
        groups, sigmas = [], []
        for k in range(k_max):
            index = torch.nonzero(stage_of == k).flatten()
            if len(index) == 0:
                continue
            start, end = self.schedule.endpoints(target[index], noise[index], k)
            shift = shift_factor(token_count(*start.shape[2:]), self.cfg.flow.shift)
            sigma = shift_sigmas(sample_sigmas(len(index), self.cfg.flow, generator), shift)
            s = sigma.view(-1, 1, 1, 1, 1)
            x_t = s * start + (1 - s) * end
            groups.append(NoisyGroup(index, x_t, self.schedule.timestep(k, sigma), start - end, f"stage{k}"))
            sigmas.append(sigma)
        stats = {"sigma_mean": float(torch.cat(sigmas).mean()), "shift": float("nan")}
        stats.update({f"frac_stage{k}": float((stage_of == k).float().mean()) for k in range(k_max)})
        return groups, stats

    def extra_metric_names(self) -> list[str]:
        k = range(self.schedule.stages)
        return [f"loss_stage{i}" for i in k] + [f"frac_stage{i}" for i in k]
