"""Initialise a Helios transformer from Wan-2.1-T2V (paper §5.1: Helios starts from Wan-2.1-T2V-14B).

Every Wan weight has the same name and shape in ``HeliosTransformer3DModel`` except the output
modulation table (``scale_shift_table`` -> ``norm_out.scale_shift_table``). Wan has no multi-term
memory patch convs; they are initialised from the patch embedding:

* ``patch_short`` (kernel 1x2x2) = a copy of ``patch_embedding``;
* ``patch_mid`` (2x4x4) and ``patch_long`` (4x8x8), ``memory_patch_init=interleave`` (the reference code's
  rule): every element of the patch kernel repeated over 2x2x2 (4x4x4) and divided by 8 (64), i.e. the
  patch embedding of the average-pooled (2x / 4x) latent;
* ``memory_patch_init=random``: what the reference's training run actually started from: it applies that
  rule in the model's constructor to the xavier-initialised patch embedding, before the Wan weights load
  (``strict=False`` keeps the result), so Helios-Base's memory patches began from a random kernel.

With no history the converted model computes exactly what the Wan model computes (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from helios.model.weights import helios_from_state

WAN_TO_HELIOS_RENAMES = {"scale_shift_table": "norm_out.scale_shift_table"}


def helios_config_from_wan(wan_config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Map a diffusers ``WanTransformer3DModel`` config to ``HeliosTransformer3DModel`` kwargs."""
    if wan_config.get("image_dim") or wan_config.get("added_kv_proj_dim"):
        raise ValueError(
            "Helios initialises from Wan-2.1 *T2V*; this checkpoint has image conditioning (I2V)"
        )
    head_dim = wan_config["attention_head_dim"]
    h = w = 2 * (head_dim // 6)
    cfg = {
        "patch_size": tuple(wan_config["patch_size"]),
        "num_attention_heads": wan_config["num_attention_heads"],
        "attention_head_dim": head_dim,
        "in_channels": wan_config["in_channels"],
        "out_channels": wan_config["out_channels"],
        "text_dim": wan_config["text_dim"],
        "freq_dim": wan_config["freq_dim"],
        "ffn_dim": wan_config["ffn_dim"],
        "num_layers": wan_config["num_layers"],
        "cross_attn_norm": wan_config["cross_attn_norm"],
        "qk_norm": wan_config["qk_norm"],
        "eps": wan_config["eps"],
        "rope_dim": (head_dim - h - w, h, w),
        "has_multi_term_memory_patch": True,
    }
    cfg.update(overrides)
    return cfg


def _interleave(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """Each element of a (1, ph, pw) patch kernel repeated over a factor^3 block (the reference's
    ``einops.repeat(w, "o i t h w -> o i (t f) (h f) (w f)") / f^3``)."""
    for dim in (2, 3, 4):
        weight = weight.repeat_interleave(factor, dim=dim)
    return weight / float(factor**3)


def _random_patch(like: torch.Tensor, bias: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch embedding as the reference's constructor leaves it: xavier-uniform over the flattened kernel,
    the Conv3d default bias (uniform +-1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    fan_out, fan_in = like.shape[0], like[0].numel()
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    weight = (torch.rand(like.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    b = (torch.rand(bias.shape, generator=gen, dtype=torch.float32) * 2 - 1) / fan_in**0.5
    return weight.to(like.dtype), b.to(bias.dtype)


def convert_wan_state_dict(
    wan_sd: dict[str, torch.Tensor], memory_patch_init: str = "interleave", seed: int = 0
) -> dict:
    """Wan state dict -> Helios state dict (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in wan_sd.items():
        out[WAN_TO_HELIOS_RENAMES.get(key, key)] = value
    weight, bias = wan_sd["patch_embedding.weight"], wan_sd["patch_embedding.bias"]
    if weight.shape[2] != 1:
        raise ValueError(f"expected a temporal patch size of 1, got kernel {tuple(weight.shape[2:])}")
    out["patch_short.weight"], out["patch_short.bias"] = weight.clone(), bias.clone()
    if memory_patch_init == "random":
        weight, bias = _random_patch(weight, bias, seed)
        out["patch_short.weight"], out["patch_short.bias"] = weight.clone(), bias.clone()
    elif memory_patch_init not in ("interleave", "average"):
        raise ValueError(f"unknown memory_patch_init {memory_patch_init!r} (interleave | random)")
    for name, factor in (("patch_mid", 2), ("patch_long", 4)):
        if memory_patch_init == "average":  # earlier checkpoints' rule: the kernel tiled over the block
            out[f"{name}.weight"] = weight.repeat(1, 1, factor, factor, factor) / float(factor**3)
        else:
            out[f"{name}.weight"] = _interleave(weight, factor)
        out[f"{name}.bias"] = bias.clone()
    return out


def load_wan_as_helios(
    path: str,
    subfolder: str | None = None,
    memory_patch_init: str = "interleave",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
):
    """Load a diffusers Wan-2.1 T2V transformer and return an equivalent ``HeliosTransformer3DModel``.

    The Wan model is loaded in ``dtype`` (diffusers' fp32 modules kept), the Helios model is created on
    the meta device and the converted tensors are assigned, so the 14B weights are held once in host
    memory.
    """
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    config = helios_config_from_wan(dict(wan.config), **overrides)
    state = convert_wan_state_dict(wan.state_dict(), memory_patch_init, seed)
    del wan
    try:
        return helios_from_state(config, state, dtype)
    except ValueError as err:
        raise ValueError(f"Wan checkpoint {path}: {err}") from None
