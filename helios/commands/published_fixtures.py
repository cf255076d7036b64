"""Tiny models in the *published* layouts, to rehearse the real recipe without downloading 14B weights.

``python -m helios.fixtures output=DIR`` writes, through the real classes' ``save_pretrained``:

* ``DIR/Wan2.1-T2V-14B-Diffusers``: a ``WanPipeline`` directory (``model_index.json``, ``transformer``,
  ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``), the layout of Wan-AI's diffusers release;
* ``DIR/Helios-Base``: a ``HeliosPipeline`` (``HeliosScheduler``, one stage, UniPC);
* ``DIR/Helios-Mid``: a ``HeliosPyramidPipeline`` (3-stage ``HeliosScheduler``, ``is_cfg_zero_star``);
* ``DIR/Helios-Distilled``: a ``HeliosPyramidPipeline`` with ``HeliosDMDScheduler`` and ``is_distilled``;
* ``DIR/videos``: moving-shapes mp4 files + ``captions.jsonl`` (``helios.prepare``'s input).

Only the sizes are tiny (2 layers, 2 heads x 24, UMT5 width 32, an 8-channel Wan VAE); the Helios
transformers carry the published configs' switches (Guidance Attention, multi-term memory patches) and
are stored in bf16 like the released weights. Each Helios directory holds different weights, so a test
can tell which one a phase actually loaded. Every command of the README's recipe runs against them with
``model.transformer.path=DIR/...`` plus size overrides (see ``tests/trainer/test_rehearsal.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from helios.config.schema import FixturesConfig, TextEncoderConfig, VaeConfig
from helios.data.synthetic import make_synthetic_videos
from helios.model.encoders import build_text_encoder, build_vae, seeded
from helios.model.wan_init import load_wan_as_helios
from helios.world.shapes import RADIUS

log = logging.getLogger("helios.fixtures")

WAN = "Wan2.1-T2V-14B-Diffusers"
BASE, MID, DISTILLED = "Helios-Base", "Helios-Mid", "Helios-Distilled"


def wan_transformer_kwargs(cfg: FixturesConfig) -> dict:
    """A Wan-2.1 *T2V* transformer config (no image conditioning), tiny."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": cfg.text_dim,
        "freq_dim": 32,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
    }


def _encoders(cfg: FixturesConfig):

    tokenizer, text_encoder = build_text_encoder(TextEncoderConfig(source="tiny", d_model=cfg.text_dim))
    return tokenizer, text_encoder, build_vae(VaeConfig(source="tiny"))


def write_wan(cfg: FixturesConfig, out: Path) -> Path:
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer, text_encoder, vae = _encoders(cfg)
    transformer = seeded(cfg.seed, lambda: WanTransformer3DModel(**wan_transformer_kwargs(cfg)))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.save_pretrained(out)
    return out


def _helios_transformer(wan_dir: Path, seed: int, scale: float):
    """Helios weights as published: Wan-converted, then moved away from Wan by a seeded perturbation
    (each variant its own) and stored in bf16."""

    model = load_wan_as_helios(str(wan_dir), subfolder="transformer")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=gen))
        keep = tuple(model._keep_in_fp32_modules or ())
        for name, p in model.named_parameters():  # bf16 like the release; fp32 where diffusers keeps it
            if not any(k in name for k in keep):
                p.data = p.data.to(torch.bfloat16)
    return model


def write_helios(cfg: FixturesConfig, wan_dir: Path, out: Path, variant: str) -> Path:
    from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler

    tokenizer, text_encoder, vae = _encoders(cfg)
    seed = {BASE: 1, MID: 2, DISTILLED: 3}[variant] + cfg.seed * 10
    transformer = _helios_transformer(wan_dir, seed, 0.2)
    common = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer}
    if variant == BASE:
        scheduler = HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True)
        pipe = HeliosPipeline(scheduler=scheduler, **common)
    elif variant == MID:
        scheduler = HeliosScheduler(stages=3, use_dynamic_shifting=True)
        pipe = HeliosPyramidPipeline(scheduler=scheduler, is_cfg_zero_star=True, **common)
    else:
        scheduler = HeliosDMDScheduler(stages=3, use_dynamic_shifting=True, time_shift_type="linear")
        pipe = HeliosPyramidPipeline(scheduler=scheduler, is_distilled=True, **common)
    pipe.save_pretrained(out)
    return out


def write_fixtures(cfg: FixturesConfig) -> dict[str, Path]:
    """All published-layout directories and a raw video folder under ``cfg.output``."""

    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"wan": write_wan(cfg, root / WAN)}
    for key, variant in (("base", BASE), ("mid", MID), ("distilled", DISTILLED)):
        paths[key] = write_helios(cfg, paths["wan"], root / variant, variant)
    make_synthetic_videos(
        root / "videos",
        cfg.videos,
        cfg.video_frames,
        cfg.height,
        cfg.width,
        fps=16,
        seed=cfg.seed,
        radius=RADIUS,
    )
    paths["videos"] = root / "videos"
    (root / "fixtures.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def run(cfg: FixturesConfig) -> dict[str, Path]:
    paths = write_fixtures(cfg)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return paths
