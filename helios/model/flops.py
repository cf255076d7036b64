"""Model FLOPs and tokens of a training step, for the dashboard's ``tokens_per_s`` and ``mfu``.

Every forward of a :class:`~diffusers.HeliosTransformer3DModel` the stage runs (the trained forward, stage
3's rollout, fake-score and real-score forwards) is counted from its input shapes, on the host and without a
device sync: a forward pre-hook reads the sequence length (the noisy window in 1x2x2 patches plus the
short/mid/long history in 1x2x2, 2x4x4, 4x8x8 patches) and the text length, and the DiT's matmul FLOPs
follow from its config (:func:`forward_flops`; checked against ``torch.utils.flop_counter`` in the tests).
As in the usual MFU convention (PaLM, App. B), a forward run with gradients counts three times (its
backward twice) and recomputation under gradient checkpointing is not counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

# dense bf16 peak of one device, TFLOP/s (vendor data sheets); the first name contained in the device's
# name wins, so the specific names come first; trainer.peak_tflops overrides
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """The device's dense bf16 peak (None off a GPU or for an unknown GPU without ``trainer.peak_tflops``)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def _patches(shape: torch.Size, patch: tuple[int, int, int]) -> int:
    """Tokens of a latent [B, C, T, H, W] cut into ``patch`` (padded up, as the memory patches are)."""
    return math.prod(math.ceil(n / p) for n, p in zip(shape[2:], patch))


HISTORY_PATCHES = {"short": None, "mid": (2, 4, 4), "long": (4, 8, 8)}  # None: the model's patch size


def sequence_tokens(kwargs: dict, patch: tuple[int, int, int]) -> dict[str, int]:
    """One sample's tokens per part of the DiT's sequence: the noisy ``window`` and each history term that
    the forward receives (Multi-Term Memory Patchification, §3.3)."""
    tokens = {"window": _patches(kwargs["hidden_states"].shape, patch)}
    for term, history_patch in HISTORY_PATCHES.items():
        key = f"latents_history_{term}"
        if kwargs.get(key) is not None and kwargs.get(f"indices_{key}") is not None:
            tokens[term] = _patches(kwargs[key].shape, history_patch or patch)
    return tokens


def forward_flops(config, tokens: dict[str, int], text_tokens: int) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one sample's forward through the DiT, as ``linear`` (the
    projections, the FFN, the patch embeddings, the text embedder and the output projection; the timestep
    embedding is left out, < 1 %) and ``attention`` (scores and weighted values). Every block's
    self-attention and FFN see the whole sequence, its cross-attention only the window's tokens where
    ``guidance_cross_attn`` (Guidance Attention, §3.2.2), the output projection only the window's."""
    d = config.num_attention_heads * config.attention_head_dim
    s, w, t = sum(tokens.values()), tokens["window"], text_tokens
    q = w if config.guidance_cross_attn else s
    block_linear = 8 * s * d * d + 4 * q * d * d + 4 * t * d * d + 4 * s * d * config.ffn_dim
    block_attention = 4 * s * s * d + 4 * q * t * d
    channels = config.in_channels
    embed = 2 * w * channels * math.prod(config.patch_size) * d
    for term, history_patch in HISTORY_PATCHES.items():
        embed += 2 * tokens.get(term, 0) * channels * math.prod(history_patch or config.patch_size) * d
    linear = (
        config.num_layers * block_linear
        + embed
        + 2 * t * (config.text_dim * d + d * d)  # text embedder
        + 2 * w * d * config.out_channels * math.prod(config.patch_size)  # output projection: the window
    )
    return {"linear": linear, "attention": config.num_layers * block_attention}


@dataclass
class StepCount:
    flops: float = 0.0  # model FLOPs of the forwards (x3 with a backward)
    tokens: float = 0.0  # sequence tokens through the forwards that are trained (a backward follows)


class FlopCounter:
    """Counts the model FLOPs and trained tokens of every DiT forward inside ``module`` until :meth:`take`."""

    def __init__(self, module: torch.nn.Module) -> None:
        from diffusers import HeliosTransformer3DModel

        self.count = StepCount()
        self.counting = True
        self.handles = [
            m.register_forward_pre_hook(self._hook, with_kwargs=True)
            for m in module.modules()
            if isinstance(m, HeliosTransformer3DModel)
        ]

    def _hook(self, module, args, kwargs) -> None:
        if not self.counting:
            return
        names = ("hidden_states", "timestep", "encoder_hidden_states")
        inputs = {**dict(zip(names, args)), **kwargs}
        batch = inputs["hidden_states"].shape[0]
        tokens = sequence_tokens(inputs, tuple(module.config.patch_size))
        parts = forward_flops(module.config, tokens, inputs["encoder_hidden_states"].shape[1])
        flops = batch * sum(parts.values())
        trained = torch.is_grad_enabled()
        self.count.flops += 3 * flops if trained else flops
        self.count.tokens += batch * sum(tokens.values()) if trained else 0

    @contextlib.contextmanager
    def paused(self):
        """Forwards that are not training (validation) are not counted."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def take(self) -> StepCount:
        """The count since the last call; starts a new one."""
        count, self.count = self.count, StepCount()
        return count

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
