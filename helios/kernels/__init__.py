"""Triton kernels (paper §4.3): Flash Norm (RMSNorm / LayerNorm) and Flash RoPE, forward and backward."""

from helios.kernels.norm import FlashLayerNorm, FlashRMSNorm, flash_layer_norm, flash_rms_norm
from helios.kernels.rope import flash_rope

__all__ = ["FlashLayerNorm", "FlashRMSNorm", "flash_layer_norm", "flash_rms_norm", "flash_rope"]
