"""Sample videos from a trained transformer with diffusers' ``HeliosPipeline`` (Stage-1 sampler:
UniPC, CFG, history 16/2/1 layout as configured)."""

from __future__ import annotations

from pathlib import Path

import torch

from helios.config.schema import TrainConfig
from helios.model.encoders import build_text_encoder, build_vae


def build_pipeline(cfg: TrainConfig, transformer: torch.nn.Module, device: torch.device):
    from diffusers import HeliosPipeline, HeliosScheduler

    vae = build_vae(cfg.model.vae).to(device)
    tokenizer, text_encoder = build_text_encoder(cfg.model.text_encoder)
    scheduler = HeliosScheduler(
        stages=1,
        stage_range=[0, 1],
        use_dynamic_shifting=cfg.flow.shift.enabled,
        time_shift_type=cfg.flow.shift.type,
    )
    return HeliosPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(device),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )


@torch.no_grad()
def write_sample(
    cfg: TrainConfig,
    transformer: torch.nn.Module,
    out_path: Path,
    height: int,
    width: int,
    device: torch.device,
) -> Path:
    """Generate ``cfg.sample.num_frames`` frames for ``cfg.sample.prompt`` and write an mp4."""
    from diffusers.utils import export_to_video

    was_training = transformer.training
    transformer.eval()
    pipe = build_pipeline(cfg, transformer, device)
    long, mid, short = cfg.history.sizes
    out = pipe(
        prompt=cfg.sample.prompt,
        height=height,
        width=width,
        num_frames=cfg.sample.num_frames,
        num_inference_steps=cfg.sample.num_inference_steps,
        guidance_scale=cfg.sample.guidance_scale,
        generator=torch.Generator(device="cpu").manual_seed(cfg.sample.seed),
        max_sequence_length=cfg.model.text_encoder.max_sequence_length,
        history_sizes=[long, mid, short],
        num_latent_frames_per_chunk=cfg.history.window,
        output_type="np",
    )
    transformer.train(was_training)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(out.frames[0])[: cfg.sample.num_frames]  # the pipeline renders whole sections
    export_to_video(frames, str(out_path), fps=cfg.sample.fps)
    return out_path
