"""Attention and kernel patches applied to the diffusers model by processor / module replacement.

:class:`HeliosProcessor` computes what diffusers' ``HeliosAttnProcessor`` computes (tested equal),
with two switches: the rotary embedding in eager torch or the Flash RoPE Triton kernel, and the
ablation "w Guidance Attention*" (Table 5): history queries see only history keys, so the noisy
context cannot affect the historical one.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_helios import (
    HeliosAttnProcessor,
    _get_qkv_projections,
    apply_rotary_emb_transposed,
)

try:
    from helios.kernels.norm import FlashLayerNorm, FlashRMSNorm
    from helios.kernels.rope import flash_rope
except ImportError:  # triton (the gpu extra) is not installed: model.kernels.*=triton is refused at start-up
    FlashLayerNorm = FlashRMSNorm = flash_rope = None

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = {"sdpa": "native", "flash": "flash", "flash3": "_flash_3"}


class HeliosProcessor(HeliosAttnProcessor):
    def __init__(self, rope: str = "torch", history_causal: bool = False) -> None:
        super().__init__()
        self.rope, self.history_causal = rope, history_causal

    def _rotate(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        if self.rope == "triton":
            return flash_rope(x, freqs)
        return apply_rotary_emb_transposed(x, freqs)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
        original_context_length=None,
    ):
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = self._rotate(query, rotary_emb), self._rotate(key, rotary_emb)
        history = (
            hidden_states.shape[1] - original_context_length if original_context_length is not None else 0
        )
        if not attn.is_cross_attention and attn.is_amplify_history and history > 0:
            scale = 1.0 + torch.sigmoid(attn.history_key_scale) * (attn.max_scale - 1.0)
            if attn.history_scale_mode == "per_head":
                scale = scale.view(1, 1, -1, 1)
            key = torch.cat([key[:, :history] * scale, key[:, history:]], dim=1)
        if self.history_causal and not attn.is_cross_attention and history > 0:
            total = hidden_states.shape[1]
            attention_mask = torch.ones(total, total, dtype=torch.bool, device=hidden_states.device)
            attention_mask[:history, history:] = False
        # q/k leave the norms in fp32 under autocast (rms_norm autocasts to fp32) and v in bf16: flash
        # kernels need one dtype (SDPA would cast to bf16 under autocast itself: the same numbers)
        query, key = query.to(value.dtype), key.to(value.dtype)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=(self._parallel_config if encoder_hidden_states is None else None),
        )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_processors(model: torch.nn.Module, rope: str = "torch", history_causal: bool = False) -> None:
    for module in model.modules():
        if module.__class__.__name__ == "HeliosAttention":
            module.set_processor(HeliosProcessor(rope, history_causal and not module.is_cross_attention))


def triton_usable() -> bool:
    """Triton kernels run on a CUDA GPU, or anywhere under ``TRITON_INTERPRET=1`` (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def replace_norms(model: torch.nn.Module) -> int:
    """Swap every LayerNorm (incl. diffusers' FP32LayerNorm) and RMSNorm for the Flash Norm modules,
    keeping the same parameters (state-dict keys unchanged). Returns the number replaced."""

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(parent, name, FlashLayerNorm(child))
            elif isinstance(child, torch.nn.RMSNorm):
                setattr(parent, name, FlashRMSNorm(child))
            else:
                continue
            count += 1
    return count


def set_attention_backend(model: torch.nn.Module, attention: str) -> str:
    """diffusers attention backend for ``attention=sdpa|flash|flash3``; falls back to SDPA (with a
    warning) where the GPU or the installed packages do not offer the requested one."""
    backend = ATTENTION_BACKENDS[attention]
    if attention != "sdpa":
        module = {"flash": "flash_attn", "flash3": "flash_attn_interface"}[attention]
        try:
            __import__(module)
        except ImportError:
            log.warning(
                "attention=%s needs the %s package (pip install -e '.[gpu]'); using SDPA", attention, module
            )
            backend = "native"
    model.set_attention_backend(backend)
    return backend
