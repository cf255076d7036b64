"""Stage 2 (Helios-Mid): pyramid velocity matching (paper §3.3.2, Eq. 5-7), history as in Stage 1."""

from __future__ import annotations

import torch

from helios.config.schema import TrainConfig
from helios.core.flow_matching import sample_sigmas, shift_factor, shift_sigmas, token_count
from helios.core.pyramid import PyramidSchedule
from helios.stages.stage import WeightsLoader
from helios.stages.stage1_base import NoisyGroup, Stage1Base


class Stage2Mid(Stage1Base):
    """Each stage-sample trains one pyramid stage k on the straight path between the stage's start and end
    points at its resolution (Eq. 5-7); sigma is sampled as in Stage 1 and shifted by the stage's own
    token count; the stage-samples of one stage share a forward pass. ``pyramid.stage_draw=every`` (the
    reference): every clip at every stage, ``stage_ratios[k]`` times, its noise shared by them; ``random``:
    each clip at one stage drawn from the rank-shared generator, so every rank makes the same forward
    passes (ZeRO-3)."""

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        super().__init__(cfg, weights)
        self.schedule = PyramidSchedule(cfg.pyramid.stages, cfg.pyramid.gamma)
        # the draw's weights (multinomial normalises them; float32 or float64 weights draw the same stages)
        self.weights = torch.tensor(cfg.pyramid.stage_ratios, dtype=torch.float64)  # pragma: no mutate

    def stage_samples(self, clips: int, shared: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the clip, the stage) of each stage-sample of a micro-batch of ``clips`` clips."""
        if self.cfg.pyramid.stage_draw == "random":
            drawn = torch.multinomial(self.weights, clips, replacement=True, generator=shared)
            return torch.arange(clips), drawn
        repeats = torch.tensor([round(r) for r in self.cfg.pyramid.stage_ratios])
        stage_of = torch.repeat_interleave(torch.arange(len(repeats)), repeats)
        return torch.arange(clips).repeat_interleave(len(stage_of)), stage_of.repeat(clips)

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
        clip_of, stage_of = self.stage_samples(target.shape[0], shared)
        noise = torch.randn(target.shape, generator=generator)  # one per clip, shared by its stage-samples
        groups, sigmas = [], []
        for k in range(k_max):
            index = clip_of[stage_of == k]
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
