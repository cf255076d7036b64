"""VAE (``AutoencoderKLWan``) and UMT5 text encoder: load pretrained or build the tiny ones.

The tiny set needs no download: a word-piece tokenizer built in code, a small seeded UMT5 encoder and a small
Wan VAE: by default the one shipped in ``helios/assets/tiny_vae`` (trained on the moving-shapes world by
``python -m helios.tiny_vae``), or a seeded random one whose ``latents_mean/std`` are calibrated on fixed
moving-shapes videos, so normalised latents have roughly unit scale like the real VAE's.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, HeliosPipeline
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from helios.config.schema import TextEncoderConfig, VaeConfig
from helios.world.shapes import render_clip

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# the tiny word-piece tokenizer's whole words (ids 3-19, in this order): every word of the moving-shapes
# world's captions (tests/model/test_encoders.py checks the world uses no other)
TINY_WORDS = (
    *("a", "background", "black", "blue", "circle", "down", "gray", "green", "left"),
    *("moving", "on", "red", "right", "square", "up", "white", "yellow"),
)
VAE_TEMPORAL = 4  # Wan VAE: 4x temporal compression, the first frame on its own


def video_frames_for(latent_frames: int) -> int:
    """Pixel frames that the causal Wan VAE encodes into (or decodes from) ``latent_frames`` latents."""
    return VAE_TEMPORAL * (latent_frames - 1) + 1


def latent_frames_for(video_frames: int) -> int:
    """Latent frames whose decoding covers at least ``video_frames`` frames."""
    return -(-(video_frames - 1) // VAE_TEMPORAL) + 1


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer over code points 0-255 with T5-style ``</s>`` and ``<pad>`` (id 0): the tiny
    encoder's before the word-piece one (``model.text_encoder.tiny_tokenizer=bytes``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{chr(i): i + 3 for i in range(256)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-piece tokenizer with T5-style ``</s>`` and ``<pad>`` (id 0): every word of the moving-shapes
    world is one token (as UMT5's sentencepiece keeps common words whole), any other word is spelled in
    characters of code points 0-255 (a character outside them is ``<unk>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pieces = [*TINY_WORDS, *(chr(i) for i in range(256)), *(f"##{chr(i)}" for i in range(256))]
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{p: i + 3 for i, p in enumerate(dict.fromkeys(pieces))}}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=1000))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def seeded(seed: int, fn):
    """``fn()`` under a fixed torch seed, the global random state restored after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return fn()
    finally:
        torch.random.set_rng_state(state)


def build_text_encoder(cfg: TextEncoderConfig) -> tuple[PreTrainedTokenizerFast, UMT5EncoderModel]:
    if cfg.source == "pretrained":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.path, subfolder=cfg.tokenizer_subfolder or "")
        encoder = UMT5EncoderModel.from_pretrained(cfg.path, subfolder=cfg.subfolder or "")
    else:
        tokenizer = tiny_tokenizer() if cfg.tiny_tokenizer == "words" else byte_tokenizer()
        config = tiny_text_encoder_config(cfg, len(tokenizer))
        encoder = seeded(cfg.init_seed, lambda: UMT5EncoderModel(config))
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def tiny_text_encoder_config(cfg: TextEncoderConfig, vocab_size: int) -> UMT5Config:
    """The tiny (``source: tiny``) UMT5 encoder's shape."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=max(8, cfg.d_model // 2),
        d_ff=cfg.d_model * 2,
        num_layers=cfg.num_layers,
        num_heads=2,
    )


@torch.no_grad()
def encode_prompts(
    tokenizer, encoder, prompts: list[str], max_sequence_length: int, device: torch.device | None = None
) -> torch.Tensor:
    """Prompt embeddings exactly as diffusers' Helios pipelines compute them (cleaned text,
    padded to ``max_sequence_length``, zeros after the last token)."""
    pipe = HeliosPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None, transformer=None
    )
    device = device or next(encoder.parameters()).device
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
    )
    return embeds


TINY_VAE_KWARGS = {"num_res_blocks": 1, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]}
TRAINED_TINY_VAE = Path(__file__).resolve().parents[1] / "assets" / "tiny_vae"  # diffusers layout


@cache
def trained_tiny_vae_digest() -> str:
    """SHA-256 (16 hex digits) of the shipped tiny VAE's weights: part of the synthetic data's cache key."""
    weights = TRAINED_TINY_VAE / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def build_vae(cfg: VaeConfig) -> AutoencoderKLWan:
    if cfg.source == "pretrained":
        vae = AutoencoderKLWan.from_pretrained(cfg.path, subfolder=cfg.subfolder)
    elif cfg.tiny_weights == "trained":
        vae = AutoencoderKLWan.from_pretrained(TRAINED_TINY_VAE)
    else:
        vae = seeded(cfg.init_seed, lambda: AutoencoderKLWan(base_dim=cfg.base_dim, **TINY_VAE_KWARGS))
        _calibrate(vae, cfg.init_seed)
    vae.requires_grad_(False).eval()
    return vae


@torch.no_grad()
def _calibrate(vae: AutoencoderKLWan, seed: int) -> None:
    """Set ``latents_mean/std`` of a randomly initialised VAE from fixed moving-shapes clips."""
    gen = torch.Generator().manual_seed(seed)
    clips = torch.stack([render_clip(17, 64, 64, gen)[0] for _ in range(4)])  # [N, C, T, H, W] in [-1, 1]
    z = vae.encode(clips).latent_dist.mode()
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())


def latent_stats(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) as [1, C, 1, 1, 1] tensors from the VAE config."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_video(
    vae: AutoencoderKLWan, video: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents ``(z - mean) / std``: a posterior sample
    drawn from ``generator`` (as the reference's data tool and diffusers' pipelines do), or the
    posterior mode without one."""
    param = next(vae.parameters())
    dist = vae.encode(video.to(param.device, param.dtype)).latent_dist
    z = (dist.sample(generator=generator) if generator is not None else dist.mode()).float()
    mean, std = latent_stats(vae)
    return (z - mean.to(z.device)) / std.to(z.device)


@torch.no_grad()
def encode_sections(
    vae: AutoencoderKLWan, video: torch.Tensor, section_latents: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The section latent format of the released checkpoints: each ``4(n-1)+1``-frame section of
    ``video`` [B, 3, S*(4(n-1)+1), H, W] encoded on its own (its first latent a single-frame latent),
    the sections' latents concatenated in time: [B, C, S*n, h, w]."""
    frames = video_frames_for(section_latents)
    b, c, t, h, w = video.shape
    if t % frames:
        raise ValueError(f"{t} frames are not whole sections of {frames} frames")
    s = t // frames
    chunks = video.view(b, c, s, frames, h, w).transpose(1, 2).reshape(b * s, c, frames, h, w)
    z = encode_video(vae, chunks, generator)  # the batch axis keeps the sections independent
    _, zc, zt, zh, zw = z.shape
    return z.view(b, s, zc, zt, zh, zw).transpose(1, 2).reshape(b, zc, s * zt, zh, zw)
