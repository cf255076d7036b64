"""Text/image/video -> long video: prompt encoding, the autoregressive loop, streaming decode, and
per-section statistics. Shared by ``helios.generate`` and the trainer's validation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helios.config.schema import CorruptConfig, SamplerConfig
from helios.core.history import HistoryLayout
from helios.data.video import ffmpeg_probe
from helios.model.encoders import encode_prompts, encode_sections, encode_video, latent_frames_for
from helios.sampling.autoregressive import sample_video
from helios.sampling.decode import SectionDecoder, seam_statistic, section_frames
from helios.sampling.drift import AdaptiveAntiDrift, AdaptiveConfig, drift_report, section_stats
from helios.sampling.prompts import PromptSchedule, texts_to_encode, unconditional_embeds
from helios.sampling.section import Guidance, SectionSampler


def build_section_sampler(cfg: SamplerConfig, patch_size=(1, 2, 2)) -> SectionSampler:
    """Scheduler + guidance from config: unipc (1 stage), pyramid (K stages), dmd (K stages, no CFG)."""
    from diffusers import HeliosDMDScheduler, HeliosScheduler

    k = len(cfg.steps)
    stage_range = [i / k for i in range(k + 1)]
    if cfg.kind == "dmd":
        scheduler = HeliosDMDScheduler(
            stages=k,
            stage_range=stage_range,
            gamma=cfg.gamma,
            use_dynamic_shifting=True,
            time_shift_type=cfg.shift_type,
        )
    else:
        scheduler = HeliosScheduler(
            stages=k,
            stage_range=stage_range,
            gamma=cfg.gamma,
            use_dynamic_shifting=True,
            time_shift_type=cfg.shift_type,
        )
    guidance = Guidance(scale=cfg.guidance_scale, cfg_zero_star=cfg.cfg_zero_star)
    return SectionSampler(
        scheduler,
        cfg.steps,
        guidance,
        patch_size,
        amplify_first=cfg.amplify_first,
        shift_after_upsample=cfg.shift_order == "stage",
    )


def sections_for(num_frames: int, window: int, latent_format: str = "clip") -> int:
    """Sections whose decoded frames cover ``num_frames``: ``4(n-1)+1`` frames each in the section
    format; with the streaming decode the causal VAE gives ``4(T-1)+1`` frames for T latents."""
    if latent_format == "sections":
        return max(1, math.ceil(num_frames / section_frames(window, latent_format)[0]))
    return max(1, math.ceil(latent_frames_for(num_frames) / window))


@dataclass
class VideoResult:
    frames: torch.Tensor  # [B, 3, T, H, W] in [-1, 1]
    latents: torch.Tensor
    stats: dict = field(default_factory=dict)


@dataclass
class Conditioning:
    """I2V / V2V inputs as latents, in the model's latent format (what :func:`sample_video` feeds)."""

    anchor: torch.Tensor | None = None  # the first-frame anchor [B, C, 1, h, w]
    history: torch.Tensor | None = None  # latents at the end of the history buffer [B, C, T, h, w]


@torch.no_grad()
def encode_conditioning(
    vae,
    image: torch.Tensor | None,
    video: torch.Tensor | None,
    window: int,
    latent_format: str,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Conditioning:
    """``image`` [B, 3, 1, H, W] / ``video`` [B, 3, T, H, W] pixels -> :class:`Conditioning`.

    Section format (as diffusers' Helios pipelines, and as training saw it): the anchor is a
    single-frame latent of the image / the video's first frame; the I2V history slot is the last latent
    of the image repeated over one section (a regular latent); a video is encoded in whole sections
    aligned to its end. Clip format: the image latent fills both slots; the video is encoded at once.
    """
    if image is None and video is None:
        return Conditioning()
    if latent_format != "sections":
        if image is not None:
            latent = encode_video(vae, image.to(device))
            return Conditioning(latent, latent)
        latents = encode_video(vae, video.to(device))
        return Conditioning(latents[:, :, :1], latents)
    frames = section_frames(window, latent_format)[0]
    if image is not None:
        still = image.to(device).repeat(1, 1, frames, 1, 1)
        return Conditioning(
            encode_video(vae, image.to(device), generator),
            encode_video(vae, still, generator)[:, :, -1:],
        )
    whole = video.shape[2] // frames * frames
    if whole == 0:
        raise ValueError(
            f"video= has {video.shape[2]} frames; this model's sections take {frames} frames each"
        )
    video = video.to(device)
    return Conditioning(
        encode_video(vae, video[:, :, :1], generator),
        encode_sections(vae, video[:, :, video.shape[2] - whole :], window, generator),
    )


@dataclass
class SectionProgress:
    """One section of a video, done: its number (from 1), of how many, its seconds (sampling and decoding)
    and its frames, and the frames so far."""

    section: int
    sections: int
    seconds: float
    frames: int
    frames_so_far: int

    def line(self) -> str:
        return (
            f"section {self.section}/{self.sections}: {self.seconds:.1f} s, {self.frames} frames "
            f"({self.frames / max(self.seconds, 1e-9):.1f} frames/s), {self.frames_so_far} so far"
        )


@torch.no_grad()
def generate_video(
    transformer,
    vae,
    tokenizer,
    text_encoder,
    layout: HistoryLayout,
    sampler_cfg: SamplerConfig,
    prompts: list[tuple[int, str]],
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    max_sequence_length: int,
    image: torch.Tensor | None = None,
    video: torch.Tensor | None = None,
    adaptive_seed: int = 0,
    *,
    latent_format: str,
    progress: Callable[[SectionProgress], None] | None = None,
    prompt_embeds: dict[str, torch.Tensor] | None = None,
) -> VideoResult:
    """``prompts``: [(first_section, text), ...]; ``image`` [B, 3, 1, H, W] / ``video`` [B, 3, T, H, W]
    pixels in [-1, 1] for I2V / V2V. ``latent_format``: what the model was trained on; it decides how
    the conditioning is encoded and how sections are decoded (:class:`SectionDecoder`). ``progress`` sees
    each section as soon as it is decoded. ``prompt_embeds``: every prompt's (and a negative prompt's)
    embeddings encoded beforehand (training's validation: no text encoder is loaded then)."""
    device = next(transformer.parameters()).device
    t_text = time.perf_counter()
    texts = texts_to_encode([p for _, p in prompts], sampler_cfg.negative_prompt)
    if prompt_embeds is None:
        encoded = encode_prompts(tokenizer, text_encoder, texts, max_sequence_length, device)
        prompt_embeds = dict(zip(texts, encoded))
    embeds = {text: prompt_embeds[text].to(device) for text in texts}
    schedule = PromptSchedule([(s, embeds[p][None]) for s, p in prompts], sampler_cfg.interpolation_steps)
    negative = (
        unconditional_embeds(sampler_cfg.negative_prompt, embeds)
        if sampler_cfg.guidance_scale > 1.0
        else None
    )
    t_text = time.perf_counter() - t_text

    cond = encode_conditioning(vae, image, video, layout.window, latent_format, device)
    adaptive = None
    if sampler_cfg.adaptive.enabled:
        a = sampler_cfg.adaptive
        adaptive = AdaptiveAntiDrift(
            AdaptiveConfig(
                True,
                a.rho_mu,
                a.rho_sigma,
                a.delta_mu,
                a.delta_sigma,
                CorruptConfig(  # every frame of a drifting section: noise of level a.noise
                    mode="paper",
                    p_exposure=0.0,
                    p_noise=1.0,
                    p_downsample=0.0,
                    p_clean=0.0,
                    noise=[a.noise, a.noise],
                ),
            ),
            seed=adaptive_seed,
        )
    decoder = SectionDecoder(vae, latent_format)
    pieces, per_section, vae_time = [], [], [0.0]
    if cond.history is not None:
        shown = cond.anchor if image is not None else cond.history  # I2V: the image itself
        pieces.append(decoder.push_conditioning(shown, layout.window))

    sampler = build_section_sampler(sampler_cfg, tuple(transformer.config.patch_size))
    num_sections = sections_for(num_frames, layout.window, latent_format)
    clock = [time.perf_counter(), 0]  # the last section's end, the frames generated so far

    def on_section(k: int, latents: torch.Tensor) -> None:
        t0 = time.perf_counter()
        frames = decoder.push(latents)
        vae_time[0] += time.perf_counter() - t0
        pieces.append(frames)
        per_section.append(section_stats(frames))
        if progress is not None:
            now = time.perf_counter()
            clock[1] += frames.shape[2]
            progress(SectionProgress(k + 1, num_sections, now - clock[0], frames.shape[2], clock[1]))
            clock[0] = now

    result = sample_video(
        transformer,
        layout,
        sampler,
        schedule,
        negative,
        num_sections,
        (height // 8, width // 8),
        generator,
        adaptive=adaptive,
        on_section=on_section,
        device=device,
        anchor=cond.anchor,
        history=cond.history,
        anchor_from_second_section=sampler_cfg.anchor_from_second_section,
    )
    frames = torch.cat(pieces, dim=2)
    cond_frames = pieces[0].shape[2] if len(pieces) > num_sections else 0
    generated = frames[:, :, cond_frames : cond_frames + num_frames]
    first, rest = section_frames(layout.window, latent_format)
    dit_time = sum(result.section_times)  # decode runs after each section's timer stops
    stats = {
        "drift": drift_report(per_section),
        "seams": seam_statistic(generated, rest, first if cond_frames == 0 else rest),
        "adaptive_drift_sections": result.drift_sections,
        "timing_s": {
            "text": t_text,
            "dit": dit_time,
            "vae_decode": vae_time[0],
            "per_section_dit": [t for t in result.section_times],
        },
        "frames": int(generated.shape[2]),
        "sections": num_sections,
        "latent_format": latent_format,
    }
    # I2V / V2V: the conditioning frames open the output video
    return VideoResult(frames[:, :, : cond_frames + num_frames], result.latents, stats)


def save_video(frames: torch.Tensor, path: str | Path, fps: int, stats: dict) -> None:
    """Frames [3, T, H, W] in [-1, 1] to ``path`` (mp4) with ``stats`` as JSON next to it; both files are
    read back after writing, so an encoder or disk failure raises (naming the file) instead of leaving a
    missing or broken video behind a success message."""
    import json
    import os

    from diffusers.utils import export_to_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = ((frames.permute(1, 2, 3, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy()
    try:
        export_to_video(list(video), str(path), fps=fps)
        written = ffmpeg_probe(path)[0]
    except Exception as err:  # the encoder and ffmpeg report failures in their own ways
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"writing {path} failed: {reason}") from None
    if written != video.shape[0]:
        raise OSError(f"writing {path} failed: it holds {written} of {video.shape[0]} frames")
    report = path.with_suffix(".json")
    tmp = report.with_name(report.name + ".tmp")  # pragma: no mutate (a temporary name)
    tmp.write_text(json.dumps(stats, indent=2))  # pragma: no mutate (the layout only)
    json.loads(tmp.read_text())
    os.replace(tmp, report)
