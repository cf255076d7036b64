"""Transformers that hold given tensors themselves: built on the meta device, the state's tensors
assigned (no second copy of a 14B base in host memory), in the compute dtype but for the modules
diffusers keeps in fp32."""

from __future__ import annotations

import torch
from diffusers import HeliosTransformer3DModel

HELIOS_ONLY_DEFAULTS = ("history_key_scale",)  # Guidance Attention amplification, init by the model


def keeps_fp32(name: str) -> bool:
    """Whether diffusers keeps parameter ``name`` of a Helios transformer in fp32."""
    parts = name.split(".")
    return any(k in parts for k in HeliosTransformer3DModel._keep_in_fp32_modules or ())


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (fp32 where diffusers keeps fp32); a tensor already in its
    dtype is not copied."""
    return {
        k: v.to(torch.float32 if keeps_fp32(k) else dtype) if v.is_floating_point() else v
        for k, v in state.items()
    }


def helios_from_state(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> HeliosTransformer3DModel:
    """A ``HeliosTransformer3DModel`` of ``config`` whose parameters are ``state``'s tensors (cast by
    :func:`cast_state`). Every parameter must be in ``state`` but the amplification logits
    (``HELIOS_ONLY_DEFAULTS``: the model's own init, ones); unknown tensors are an error."""
    from accelerate import init_empty_weights

    with torch.random.fork_rng(devices=[]), init_empty_weights():  # draws nothing from the run's stream
        model = HeliosTransformer3DModel(**config)
    expected = set(model.state_dict().keys())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"weights unknown to this Helios transformer: {unexpected[:8]}")
    missing = sorted(expected - set(state))
    bad = [k for k in missing if not any(s in k for s in HELIOS_ONLY_DEFAULTS)]
    if bad:
        raise ValueError(f"weights missing for this Helios transformer: {bad[:8]}")
    model.load_state_dict(cast_state(state, dtype), strict=False, assign=True)
    for name in missing:  # amplification logits: the model's own init (ones)
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, param_name).shape
        setattr(module, param_name, torch.nn.Parameter(torch.ones(shape)))
    # non-persistent RoPE buffers were created on meta: rebuild them on the CPU
    model.rope = type(model.rope)(rope_dim=config["rope_dim"], theta=model.config.rope_theta)
    return model
