"""Attention processor variants applied to the diffusers model by processor replacement (no fork)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_helios import HeliosAttnProcessor


class HistoryCausalAttnProcessor(HeliosAttnProcessor):
    """Self-attention where history queries see only history keys, so the noisy context cannot
    affect the historical one: the paper's ablation "w Guidance Attention*" (Table 5, Fig. 16).
    Noisy queries still see everything; cross-attention is unchanged."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
        original_context_length=None,
    ):
        if not attn.is_cross_attention and original_context_length is not None:
            total = hidden_states.shape[1]
            history = total - original_context_length
            if history > 0:
                keep = torch.ones(total, total, dtype=torch.bool, device=hidden_states.device)
                keep[:history, history:] = False
                attention_mask = keep
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, original_context_length
        )


def apply_history_causal_mask(model: torch.nn.Module) -> None:
    for module in model.modules():
        if module.__class__.__name__ == "HeliosAttention" and not module.is_cross_attention:
            module.set_processor(HistoryCausalAttnProcessor())
