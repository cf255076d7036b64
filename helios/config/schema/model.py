"""Model schema: the DiT (diffusers' HeliosTransformer3DModel), LoRA, VAE, text encoder, kernels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from helios.config.schema.base import Validated, check, choice


@dataclass
class TransformerConfig(Validated):
    """`HeliosTransformer3DModel` construction (diffusers is the model definition).

    ``source``: ``random`` (seeded init from the shape fields below), ``helios`` (a diffusers
    Helios checkpoint at ``path``) or ``wan`` (a diffusers Wan-2.1 T2V checkpoint at ``path``,
    converted on load, see :mod:`helios.model.wan_init`).
    """

    source: str = "random"
    path: str | None = None
    subfolder: str | None = None
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    rope_dim: list[int] = field(default_factory=lambda: [44, 42, 42])
    rope_theta: float = 10000.0
    # Guidance Attention (§3.1.2)
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"
    # Ablation "w Guidance Attention*" (Table 5): history queries do not see noisy keys.
    history_causal_mask: bool = False
    # How the multi-term memory patch convs start from Wan (helios/model/wan_init.py): "interleave", the
    # reference's rule (the patch embedding of the average-pooled latent); "random", what its run did;
    # "average" (the kernel tiled) is read back from checkpoints written before 2026-12-04 only
    memory_patch_init: str = "interleave"
    init_seed: int = 0
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: each block's saved input waits for the backward in pinned host memory,
    # copied back when the block is recomputed (helios/model/activation_offload.py; the same computation,
    # two copies of the residual stream per block and step)
    checkpoint_offload: bool = False

    def _validate(self, prefix: str) -> None:
        choice(self.source, ("random", "helios", "wan"), prefix + "source")
        check(
            not self.checkpoint_offload or self.gradient_checkpointing,
            prefix + "checkpoint_offload",
            "offloads what gradient checkpointing saves: set gradient_checkpointing=true too",
        )
        if self.source != "random":
            check(bool(self.path), prefix + "path", f"source={self.source!r} needs a checkpoint directory")
        check(len(self.rope_dim) == 3, prefix + "rope_dim", "needs three entries (t, h, w)")
        check(
            sum(self.rope_dim) == self.attention_head_dim,
            prefix + "rope_dim",
            f"must sum to attention_head_dim={self.attention_head_dim}, got {sum(self.rope_dim)}",
        )
        check(all(d % 2 == 0 for d in self.rope_dim), prefix + "rope_dim", "entries must be even")
        for name in ("num_attention_heads", "attention_head_dim", "text_dim", "ffn_dim", "num_layers"):
            check(getattr(self, name) > 0, prefix + name, "must be > 0")
        choice(self.history_scale_mode, ("per_head", "scalar"), prefix + "history_scale_mode")
        choice(self.memory_patch_init, ("interleave", "random", "average"), prefix + "memory_patch_init")


@dataclass
class LoraConfig(Validated):
    """LoRA through peft (Table 1: rank = alpha)."""

    enabled: bool = True
    rank: int = 128
    alpha: int = 128
    dropout: float = 0.0
    # "all-linear": every nn.Linear whose name has no "norm" (embedders, adaLN projection, proj_out, the
    # blocks) plus the patch embedding, as the reference code that trained the released weights;
    # "blocks": only the linears inside the DiT blocks; or a list of module-name suffixes.
    targets: Any = "all-linear"
    # LoRA on the patch embedding too (with all-linear): the reference's is_train_lora_patch_embedding, on in
    # stage 1 and 2-post, off in 2-init and stage 3 (and never on the critic)
    patch_embedding: bool = True
    # How the multi-term memory patch convs (patch_short/mid/long) train: full | lora | frozen.
    memory_patch: str = "full"
    # LoRA A's initialisation: "gaussian" (std 1/rank, B = 0: the reference's init_lora_weights="gaussian",
    # which trained the released weights) or "kaiming" (peft's default, B = 0)
    init: str = "gaussian"
    # Also train these parameters in full (name substrings), e.g. [history_key_scale].
    extra_trainable: list[str] = field(default_factory=lambda: ["history_key_scale"])

    def _validate(self, prefix: str) -> None:
        check(self.rank > 0, prefix + "rank", "must be > 0")
        check(self.alpha > 0, prefix + "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, prefix + "dropout", "must be in [0, 1)")
        check(
            self.targets in ("all-linear", "blocks")
            or (isinstance(self.targets, list | tuple) and all(isinstance(t, str) for t in self.targets)),
            prefix + "targets",
            "must be 'all-linear', 'blocks' or a list of module-name suffixes",
        )
        choice(self.memory_patch, ("full", "lora", "frozen"), prefix + "memory_patch")
        choice(self.init, ("gaussian", "kaiming"), prefix + "init")


TINY_VAE_BASE_DIM = 8  # the shipped trained tiny VAE (helios/assets/tiny_vae)


@dataclass
class VaeConfig(Validated):
    """`AutoencoderKLWan`: ``tiny`` a small one (``tiny_weights=trained``: the shipped VAE trained on the
    moving-shapes world, helios/commands/tiny_vae_training.py; ``random``: seeded init); ``pretrained`` loads
    ``path``."""

    source: str = "pretrained"
    path: str | None = None
    subfolder: str | None = "vae"
    tiny_weights: str = "trained"
    base_dim: int = 8
    init_seed: int = 0

    def _validate(self, prefix: str) -> None:
        choice(self.source, ("tiny", "pretrained"), prefix + "source")
        choice(self.tiny_weights, ("trained", "random"), prefix + "tiny_weights")
        if self.source == "tiny" and self.tiny_weights == "trained":
            check(
                self.base_dim == TINY_VAE_BASE_DIM,
                prefix + "base_dim",
                f"the shipped trained tiny VAE has base_dim {TINY_VAE_BASE_DIM}; other widths need "
                "model.vae.tiny_weights=random (or train one: python -m helios.tiny_vae)",
            )
        if self.source == "pretrained":
            check(bool(self.path), prefix + "path", "source='pretrained' needs a model directory")


@dataclass
class TextEncoderConfig(Validated):
    """UMT5 encoder + tokenizer: ``tiny`` (word-piece tokenizer, small seeded UMT5) or ``pretrained``."""

    source: str = "pretrained"
    path: str | None = None
    subfolder: str | None = "text_encoder"
    tokenizer_subfolder: str | None = "tokenizer"
    max_sequence_length: int = 512
    d_model: int = 32
    num_layers: int = 2
    init_seed: int = 0
    # source=tiny: "words" (word-piece: each word of the moving-shapes world one token) or "bytes" (one token
    # per byte: the tiny encoder of runs saved before the word-piece one, which sample with it)
    tiny_tokenizer: str = "words"

    def _validate(self, prefix: str) -> None:
        choice(self.source, ("tiny", "pretrained"), prefix + "source")
        choice(self.tiny_tokenizer, ("words", "bytes"), prefix + "tiny_tokenizer")
        if self.source == "pretrained":
            check(bool(self.path), prefix + "path", "source='pretrained' needs a model directory")
        check(self.max_sequence_length > 0, prefix + "max_sequence_length", "must be > 0")


@dataclass
class KernelsConfig(Validated):
    """Fused Triton kernels (§4.3) patched into the diffusers model: ``triton`` or eager ``torch``."""

    norm: str = "torch"
    rope: str = "torch"

    def _validate(self, prefix: str) -> None:
        choice(self.norm, ("torch", "triton"), prefix + "norm")
        choice(self.rope, ("torch", "triton"), prefix + "rope")


@dataclass
class ModelConfig(Validated):
    name: str = "tiny"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    # attention backend: sdpa (torch), flash (flash-attn 2), flash3 (Hopper); SDPA where unavailable
    attention: str = "sdpa"
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def _validate(self, prefix: str) -> None:
        choice(self.attention, ("sdpa", "flash", "flash3"), prefix + "attention")
