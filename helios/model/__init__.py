"""Model construction around diffusers' Helios classes: transformer, LoRA, VAE, text encoder."""

from helios.model.encoders import (
    build_text_encoder,
    build_vae,
    encode_prompts,
    encode_sections,
    encode_video,
)
from helios.model.lora import apply_lora, load_trainable_state_dict, trainable_state_dict
from helios.model.transformer import build_transformer, count_parameters

__all__ = [
    "apply_lora",
    "build_text_encoder",
    "build_transformer",
    "build_vae",
    "count_parameters",
    "encode_prompts",
    "encode_sections",
    "encode_video",
    "load_trainable_state_dict",
    "trainable_state_dict",
]
