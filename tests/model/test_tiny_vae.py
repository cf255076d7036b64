"""The tiny default's VAE: the shipped one reconstructs held-out moving-shapes clips (>= 30 dB PSNR),
the random one stays selectable, and the command that made it writes a loadable diffusers directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from helios.commands.tiny_vae_training import clips, decode_unclamped, held_out_psnr
from helios.config import compose
from helios.config.schema import ConfigError, VaeConfig
from helios.model.encoders import TINY_VAE_KWARGS, build_vae

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_tiny_vae_reconstructs_held_out_clips_at_30_db():
    vae = build_vae(compose([]).model.vae)
    psnr = held_out_psnr(vae)  # 16 clips of 9 frames (the tiny default's section), as report.json
    print(f"held-out PSNR {psnr:.2f} dB")
    assert psnr >= 30.0
    assert held_out_psnr(build_vae(VaeConfig(source="tiny", tiny_weights="random")), 8) < 15.0


def test_the_shipped_tiny_vae_keeps_a_shape_that_crosses_the_border():
    """The world is a torus: a long video's shape crosses a border every few sections. Through the shipped VAE
    (each section on its own, as the tiny data path and the long-video bench encode) a small shape split
    across a border keeps the caption's colour in every frame, so the long-video target (the shape in
    >= 95 % of every section's frames) is within reach of real clips; and over held-out clips that start
    anywhere, it is there in every frame."""
    from helios.commands.tiny_vae_training import held_out_shape_kept
    from helios.model.encoders import encode_sections
    from helios.sampling.decode import decode_sections_independently
    from helios.world.measures import PALETTE_NAMES, PRESENT_PIXELS, palette_labels, parse_caption
    from helios.world.shapes import render_clip

    vae = build_vae(compose([]).model.vae)
    scene = parse_caption("a red circle moving right on a blue background")
    # radius 7, 1.2 pixels a frame from x = 26.5: on the border x = 0 in frames 26-36 (sections 2-4 of 0-4)
    clip, _ = render_clip(45, 64, 64, torch.Generator().manual_seed(3), scene)
    with torch.no_grad():
        latents = encode_sections(vae, clip[None], 3)
        decoded = decode_sections_independently(vae, list(latents.split(3, dim=2)))[0].clamp(-1, 1)
    for video, source in ((clip, "real"), (decoded, "through the VAE")):
        label, _ = palette_labels(video)
        red = (label == PALETTE_NAMES.index("fg:red")).sum(dim=(1, 2))
        assert red.min() >= PRESENT_PIXELS, (source, red.tolist())
    assert held_out_shape_kept(vae) == 1.0


def test_decoding_for_training_is_diffusers_decode_without_the_clamp():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, **TINY_VAE_KWARGS)
    with torch.no_grad():
        vae.decoder.conv_out.bias.copy_(torch.tensor([3.0, -3.0, 0.0]))  # overshoots by construction
    z = vae.encode(clips(1, torch.Generator().manual_seed(0))).latent_dist.mode()
    plain, raw = vae.decode(z).sample, decode_unclamped(vae, z)
    assert raw[:, 0].min() > 1 and raw[:, 1].max() < -1 and torch.equal(plain, raw.clamp(-1, 1))


def test_a_trained_vae_needs_the_shipped_width():
    with pytest.raises(ConfigError, match=r"base_dim.*tiny_weights=random"):
        compose(["model.vae.base_dim=16"])
    assert compose(["model.vae.base_dim=16", "model.vae.tiny_weights=random"]).model.vae.base_dim == 16


def test_the_command_writes_a_loadable_diffusers_directory(tmp_path):
    out = tmp_path / "vae"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "helios.tiny_vae",
            f"output={out}",
            "phases=[{steps:1},{steps:2,single_every:2,sections_batch_size:1}]",
            "held_out=4",
            "threads=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [p["steps"] for p in report["phases"]] == [1, 2] and report["held_out_psnr_db"] > 0
    vae = AutoencoderKLWan.from_pretrained(out)
    assert len(vae.config.latents_mean) == vae.config.z_dim


def test_each_phase_draws_its_clips_where_it_says(monkeypatch):
    """``anywhere`` is a phase's own: its single frames and its sections start anywhere on the torus, the
    other phases' in the middle of the frame."""
    from helios.commands import tiny_vae_training
    from helios.config.schema import TinyVaeConfig, TinyVaePhase

    drawn, clips_of = [], tiny_vae_training.clips

    def recording(n, generator, frames=9, anywhere=False):
        drawn.append((frames, anywhere))
        return clips_of(n, generator, frames, anywhere)

    monkeypatch.setattr(tiny_vae_training, "clips", recording)
    for measure in ("held_out_psnr", "held_out_shape_kept", "calibrate"):
        monkeypatch.setattr(tiny_vae_training, measure, lambda *args, **kwargs: 0.0)
    phases = [
        TinyVaePhase(steps=2, single_every=2, sections_batch_size=1, anywhere=anywhere)
        for anywhere in (True, False)
    ]
    tiny_vae_training.train(TinyVaeConfig(output="unused", phases=phases, batch_size=1), log=lambda *_: None)
    assert drawn == [(9, True), (1, True), (9, False), (1, False)]
