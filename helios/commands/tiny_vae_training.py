"""Train the tiny default's VAE: a small ``AutoencoderKLWan`` fitted to the moving-shapes world, so that
tiny samples decode to shapes a person recognises (the random one decodes everything to coloured noise).

    python -m helios.tiny_vae output=DIR [init=DIR] [phases='[{steps:500,lr:1e-3}]'] [threads=2]

writes ``DIR`` in diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable
by ``AutoencoderKLWan.from_pretrained``) with ``latents_mean/std`` measured on its own latents, and
``report.json`` with the held-out reconstruction PSNR after each phase and at the end (and, on clips whose
shapes start anywhere on the torus, the PSNR and the share of frames that keep the shape). The default
phases are the shipped copy's (``helios/assets/tiny_vae``) lineage; that copy was trained in five resumed
runs of them (the first three with the lr cosine over wall-clock time rather than steps, the fifth with a
fresh optimizer), so a re-run gives a VAE of the same recipe, not the same weights (about 6.5 hours on 2
CPU cores).
``model.vae.tiny_weights=random`` keeps the random VAE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from helios.config.schema import TinyVaeConfig, TinyVaePhase
from helios.model.encoders import TINY_VAE_KWARGS, latent_stats
from helios.world.measures import section_measures
from helios.world.shapes import render_clip

SECTION_FRAMES = 9  # the tiny default's section: 3 latent frames (1 + 4 + 4 pixel frames)
SIZE = 64  # the tiny default's synthetic resolution
HELD_OUT_SEED = 10_000  # held-out clips: a stream the training never draws from


def clips(
    n: int, generator: torch.Generator, frames: int = SECTION_FRAMES, anywhere: bool = False
) -> torch.Tensor:
    """``n`` moving-shapes clips [n, 3, frames, 64, 64] in [-1, 1] (``anywhere``: see :func:`render_clip`)."""
    return torch.stack([render_clip(frames, SIZE, SIZE, generator, anywhere=anywhere)[0] for _ in range(n)])


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1], measured on [0, 1] pixels (peak 1)."""
    mse = F.mse_loss((x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def held_out_psnr(
    vae: AutoencoderKLWan, n: int = 16, frames: int = SECTION_FRAMES, anywhere: bool = False
) -> float:
    """Reconstruction (posterior mode) PSNR on ``n`` clips of the held-out stream."""
    x = clips(n, torch.Generator().manual_seed(HELD_OUT_SEED), frames, anywhere)
    out = torch.cat([vae.decode(vae.encode(x[i : i + 4]).latent_dist.mode()).sample for i in range(0, n, 4)])
    return psnr(out, x)


@torch.no_grad()
def held_out_shape_kept(vae: AutoencoderKLWan, n: int = 16) -> float:
    """Share of the frames of ``n`` held-out 9-frame clips, their shapes anywhere on the torus (often split
    across a border), whose reconstruction still shows the shape: the long-video measure's ``present``
    (:func:`section_measures`, each clip one section)."""
    generator, present = torch.Generator().manual_seed(HELD_OUT_SEED), []
    for _ in range(n):
        clip, caption = render_clip(SECTION_FRAMES, SIZE, SIZE, generator, anywhere=True)
        out = vae.decode(vae.encode(clip[None]).latent_dist.mode()).sample[0]
        present.append(section_measures(out, caption, SECTION_FRAMES, SECTION_FRAMES)[0]["present"])
    return sum(present) / n


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` without diffusers' final clamp to [-1, 1] (a clamped pixel has no gradient,
    so an overshoot could never be pulled back): the same causal frame-by-frame decoding."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(
                x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
        )
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def phase_lr(phase: TinyVaePhase, step: int) -> float:
    """The lr of ``phase`` at its ``step`` (1-based): a cosine from ``lr`` to ``lr_end``."""
    cos = 0.5 * (1 + math.cos(math.pi * (step - 1) / max(1, phase.steps - 1)))
    return phase.lr_end + (phase.lr - phase.lr_end) * cos


def _step(vae: AutoencoderKLWan, opt: torch.optim.Optimizer, x: torch.Tensor, kl_weight: float) -> float:
    """One Adam step on the posterior mode's reconstruction MSE plus ``kl_weight`` x KL."""
    posterior = vae.encode(x).latent_dist
    loss = F.mse_loss(decode_unclamped(vae, posterior.mode()), x) + kl_weight * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train(recipe: TinyVaeConfig, log=print) -> tuple[AutoencoderKLWan, dict]:
    """Fit the VAE: MSE reconstruction of the posterior mode (the tiny data path encodes with the mode)
    with a small KL term, Adam, fresh clips every step, phase after phase (:class:`TinyVaePhase`): single
    frames first (the plateau where only the background is right ends sooner there; an L1 term or
    gradient clipping keeps it longer), then more and more 9-frame sections at a falling lr."""
    torch.manual_seed(recipe.seed)
    if recipe.init:
        vae = AutoencoderKLWan.from_pretrained(recipe.init)
    else:
        vae = AutoencoderKLWan(base_dim=recipe.base_dim, **TINY_VAE_KWARGS)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.phases[0].lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    start, done, total = time.perf_counter(), 0, sum(p.steps for p in recipe.phases)
    phases = []
    for index, phase in enumerate(recipe.phases):
        for step in range(1, phase.steps + 1):
            for group in opt.param_groups:
                group["lr"] = phase_lr(phase, step)
            if step % phase.single_every == 0:
                x = clips(recipe.batch_size, gen, 1, phase.anywhere)
            else:
                x = clips(phase.sections_batch_size, gen, anywhere=phase.anywhere)
            loss = _step(vae, opt, x, recipe.kl_weight)
            done += 1
            if done % recipe.log_every == 0 or done == total:
                vae.eval()
                held_out = held_out_psnr(vae, 4)
                vae.train()
                log(
                    f"phase {index} step {done}/{total} loss {loss:.4f} held-out psnr {held_out:.2f} dB"
                    f" ({time.perf_counter() - start:.0f} s)"
                )
        vae.eval()
        phases.append({**dataclasses.asdict(phase), "held_out_psnr_db": held_out_psnr(vae, 8)})
        vae.train()
    vae.eval()
    calibrate(vae, torch.Generator().manual_seed(recipe.seed + 1))
    report = {
        "held_out_psnr_db": held_out_psnr(vae, recipe.held_out),
        "held_out_psnr_db_single_frames": held_out_psnr(vae, recipe.held_out, 1),
        "held_out_psnr_db_17_frames": held_out_psnr(vae, 8, 17),
        "held_out_psnr_db_anywhere": held_out_psnr(vae, recipe.held_out, anywhere=True),
        "held_out_shape_kept_anywhere": held_out_shape_kept(vae, recipe.held_out),
        "train_seconds": time.perf_counter() - start,
        "phases": phases,
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("output", "phases")},
    }
    return vae, report


@torch.no_grad()
def calibrate(vae: AutoencoderKLWan, generator: torch.Generator, n: int = 16) -> None:
    """``latents_mean/std`` from the posterior mode of ``n`` clips: normalised latents of unit scale."""
    z = torch.cat([vae.encode(clips(4, generator)).latent_dist.mode() for _ in range(n // 4)])
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latent_stats(vae)  # the config reads back


def run(cfg: TinyVaeConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    vae, report = train(cfg)
    out = Path(cfg.output)
    vae.save_pretrained(out, safe_serialization=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)
    return report
