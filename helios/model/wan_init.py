"""Initialise a Helios transformer from Wan-2.1-T2V (paper §5.1: Helios starts from Wan-2.1-T2V-14B).

Every Wan weight has the same name and shape in ``HeliosTransformer3DModel`` except the output
modulation table (``scale_shift_table`` -> ``norm_out.scale_shift_table``). Wan has no multi-term
memory patch convs; they are initialised from the patch embedding:

* ``patch_short`` (kernel 1x2x2) = a copy of ``patch_embedding``;
* ``patch_mid`` (2x4x4) and ``patch_long`` (4x8x8), ``memory_patch_init=average``: the patch
  kernel tiled over the 2x2x2 (4x4x4) block of short patches and divided by 8 (64), so a mid/long
  token starts as the *mean of the short-patch tokens it covers*, the same pooling the model applies
  to their RoPE (diffusers averages the rotary table over 2x2x2 / 4x4x4);
* ``memory_patch_init=zero``: mid/long start at zero weight and bias.

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


def _tile_kernel(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile a (1, ph, pw) patch kernel over a (factor, factor*ph, factor*pw) block, divided by the count."""
    reps = (1, 1, factor, factor, factor)
    return weight.repeat(*reps) / float(factor**3)


def convert_wan_state_dict(wan_sd: dict[str, torch.Tensor], memory_patch_init: str = "average") -> dict:
    """Wan state dict -> Helios state dict (see module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in wan_sd.items():
        out[WAN_TO_HELIOS_RENAMES.get(key, key)] = value
    weight, bias = wan_sd["patch_embedding.weight"], wan_sd["patch_embedding.bias"]
    if weight.shape[2] != 1:
        raise ValueError(f"expected a temporal patch size of 1, got kernel {tuple(weight.shape[2:])}")
    out["patch_short.weight"], out["patch_short.bias"] = weight.clone(), bias.clone()
    for name, factor in (("patch_mid", 2), ("patch_long", 4)):
        if memory_patch_init == "average":
            out[f"{name}.weight"] = _tile_kernel(weight, factor)
            out[f"{name}.bias"] = bias.clone()
        elif memory_patch_init == "zero":
            out[f"{name}.weight"] = torch.zeros_like(_tile_kernel(weight, factor))
            out[f"{name}.bias"] = torch.zeros_like(bias)
        else:
            raise ValueError(f"unknown memory_patch_init {memory_patch_init!r} (average | zero)")
    return out


def load_wan_as_helios(
    path: str,
    subfolder: str | None = None,
    memory_patch_init: str = "average",
    dtype: torch.dtype = torch.float32,
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
    state = convert_wan_state_dict(wan.state_dict(), memory_patch_init)
    del wan
    try:
        return helios_from_state(config, state, dtype)
    except ValueError as err:
        raise ValueError(f"Wan checkpoint {path}: {err}") from None
