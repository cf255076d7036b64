"""The autoregressive long-video loop (paper §3.1, §3.7): one section after another, each conditioned
on a fixed-size history buffer (long / mid / short + the first-frame anchor) with relative indices.

The history tensors are built by the same :class:`~helios.core.history.HistoryLayout` the trainer uses,
so sampling conditions on exactly the format the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from helios.core.history import HistoryLayout
from helios.sampling.drift import AdaptiveAntiDrift
from helios.sampling.prompts import PromptSchedule
from helios.sampling.section import SectionSampler


@dataclass
class SampleResult:
    latents: torch.Tensor  # [B, C, T, h, w]: the conditioning history latents (I2V / V2V) + generated frames
    drift_sections: list[int] = field(default_factory=list)
    section_times: list[float] = field(default_factory=list)


@torch.no_grad()
def sample_video(
    transformer: torch.nn.Module,
    layout: HistoryLayout,
    sampler: SectionSampler,
    prompts: PromptSchedule,
    negative: torch.Tensor | None,
    num_sections: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator | None = None,
    adaptive: AdaptiveAntiDrift | None = None,
    on_section: Callable[[int, torch.Tensor], None] | None = None,
    device: torch.device | None = None,
    anchor: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    trajectories: list | None = None,
    anchor_from_second_section: bool = False,
) -> SampleResult:
    """Generate ``num_sections`` sections of ``layout.window`` latent frames.

    T2V: history starts empty, the anchor becomes the first generated latent frame.
    I2V / V2V (see :func:`helios.sampling.pipeline.encode_conditioning`): ``history`` [B, C, T, h, w]
    fills the end of the history buffer, ``anchor`` [B, C, 1, h, w] is the first-frame anchor.
    ``anchor_from_second_section`` (diffusers' ``is_skip_first_chunk``): from the third section on, the
    anchor is the second section's first latent frame instead (T2V, I2V and V2V alike).
    ``on_section(k, latents)`` sees each new section (e.g. to decode it); ``trajectories`` (a list) receives
    each section's sampler trajectory (:class:`SectionSampler`'s ``trajectory``).
    """
    import time

    device = device or next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    b = (prompts(0)).shape[0]
    c = transformer.config.in_channels
    h, w = latent_hw
    buffer = torch.zeros(b, c, layout.num_history, h, w, device=device, dtype=torch.float32)
    generated: list[torch.Tensor] = []
    if anchor is not None:
        anchor = anchor.to(device, torch.float32)
    if history is not None:
        given = history.to(device, torch.float32)
        buffer = torch.cat([buffer, given], dim=2)[:, :, -layout.num_history :]
        generated.append(given)
    history = buffer

    drift_frames = torch.zeros(layout.num_history, dtype=torch.bool)
    result = SampleResult(latents=torch.empty(0))
    position = sum(g.shape[2] for g in generated)  # latent frames before the next section
    for k in range(num_sections):
        t0 = time.perf_counter()
        cond_history = history
        if adaptive is not None and drift_frames.any():
            cond_history = adaptive.corrupt(history, drift_frames)
        anchor_k = anchor if anchor is not None else torch.zeros(b, c, 1, h, w, device=device)
        offset = layout.position_offset(position, b)  # None with Relative RoPE
        inputs = {key: v.to(device) for key, v in layout.model_inputs(cond_history, anchor_k, offset).items()}
        inputs = {key: (v.to(dtype) if v.is_floating_point() else v) for key, v in inputs.items()}

        def model_fn(
            x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, inputs=inputs
        ) -> torch.Tensor:
            return transformer(
                hidden_states=x.to(dtype),
                timestep=timestep,
                encoder_hidden_states=embeds,
                **inputs,
                return_dict=False,
            )[0]

        noise = sampler.initial_noise((b, c, layout.window, h, w), generator, device)
        cond = prompts(k).to(device, dtype)
        uncond = negative.to(device, dtype) if negative is not None else None
        trajectory = [] if trajectories is not None else None
        section = sampler(
            model_fn, noise, cond, uncond, generator, first_section=k == 0, trajectory=trajectory
        ).float()
        if trajectories is not None:
            trajectories.append(trajectory)

        if anchor is None or (anchor_from_second_section and k == 1):
            anchor = section[:, :, :1]
        history = torch.cat([history, section], dim=2)[:, :, -layout.num_history :]
        drift_frames = torch.zeros(layout.num_history, dtype=torch.bool)
        if adaptive is not None and adaptive.observe(k, section):
            drift_frames[-layout.window :] = True
            result.drift_sections.append(k)
        generated.append(section)
        position += section.shape[2]
        result.section_times.append(time.perf_counter() - t0)
        if on_section is not None:
            on_section(k, section)
    result.latents = torch.cat(generated, dim=2)
    return result
