"""Build the diffusers ``HeliosTransformer3DModel`` from config (random, Helios or Wan weights)."""

from __future__ import annotations

import torch
from diffusers import HeliosTransformer3DModel

from helios.config.schema import KernelsConfig, TransformerConfig
from helios.model.activation_offload import enable_checkpointing
from helios.model.attention import replace_norms, set_attention_backend, set_processors, triton_usable
from helios.model.encoders import seeded
from helios.model.wan_init import helios_config_from_wan, load_wan_as_helios
from helios.model.weights import helios_from_state, keeps_fp32

GUIDANCE_KEYS = ("guidance_cross_attn", "zero_history_timestep", "is_amplify_history", "history_scale_mode")


def transformer_kwargs(cfg: TransformerConfig) -> dict:
    return {
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "rope_dim": tuple(cfg.rope_dim),
        "rope_theta": cfg.rope_theta,
        **{k: getattr(cfg, k) for k in GUIDANCE_KEYS},
    }


def apply_kernels(
    model: HeliosTransformer3DModel,
    cfg: TransformerConfig,
    kernels: KernelsConfig | None,
    attention: str = "sdpa",
) -> None:
    """Processor / module replacement: Flash RoPE, Flash Norm, the causal-mask ablation, backend."""

    kernels = kernels or KernelsConfig()
    if "triton" in (kernels.norm, kernels.rope) and not triton_usable():
        raise RuntimeError(
            "model.kernels.*=triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests); "
            "use model.kernels.norm=torch model.kernels.rope=torch"
        )
    if kernels.rope != "torch" or cfg.history_causal_mask:
        set_processors(model, rope=kernels.rope, history_causal=cfg.history_causal_mask)
    if kernels.norm == "triton":
        replace_norms(model)
    if attention != "sdpa":
        set_attention_backend(model, attention)


def transformer_config(cfg: TransformerConfig) -> dict:
    """The architecture ``cfg`` builds: the pretrained directory's (``helios``: its config.json;
    ``wan``: converted), else the config's shape fields (``random``), with the config's Guidance
    Attention switches."""
    guidance = {k: getattr(cfg, k) for k in GUIDANCE_KEYS}
    if cfg.source == "random":
        return transformer_kwargs(cfg)
    if cfg.source == "wan":
        from diffusers import WanTransformer3DModel

        wan = WanTransformer3DModel.load_config(cfg.path, subfolder=cfg.subfolder)
        return helios_config_from_wan(dict(wan), **guidance)
    config = HeliosTransformer3DModel.load_config(cfg.path, subfolder=cfg.subfolder)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config = {**config, **guidance}
    config["rope_dim"] = tuple(config["rope_dim"])
    return config


def build_transformer(
    cfg: TransformerConfig,
    kernels: KernelsConfig | None = None,
    attention: str = "sdpa",
    dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> HeliosTransformer3DModel:
    """``random``: seeded init (``init_seed``) so every rank and every resume builds the same base;
    ``helios``: a diffusers Helios directory; ``wan``: a diffusers Wan-2.1 T2V directory, converted.
    ``state`` (a merged previous phase, a teacher): the model of ``cfg``'s architecture holding those
    tensors themselves instead (nothing else is loaded, no second copy). ``dtype``: the weights'
    dtype (diffusers' fp32 modules kept fp32); None: as the source stores them, fp32 for ``random``.

    The Guidance Attention switches of the config override the checkpoint's own settings.
    """
    guidance = {k: getattr(cfg, k) for k in GUIDANCE_KEYS}
    if state is not None:
        model = helios_from_state(transformer_config(cfg), state, dtype or torch.float32)
    elif cfg.source == "random":
        model = seeded(cfg.init_seed, lambda: HeliosTransformer3DModel(**transformer_kwargs(cfg)))
    elif cfg.source == "helios":
        # diffusers keeps some modules in fp32 (``_keep_in_fp32_modules``) and refuses
        # low_cpu_mem_usage=False for such a model: load with its defaults
        model = HeliosTransformer3DModel.from_pretrained(
            cfg.path, subfolder=cfg.subfolder, torch_dtype=dtype, **guidance
        )
    else:
        model = load_wan_as_helios(
            cfg.path, cfg.subfolder, cfg.memory_patch_init, dtype or torch.float32, cfg.init_seed, **guidance
        )
    apply_kernels(model, cfg, kernels, attention)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_offload)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def frozen_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype of each frozen floating-point parameter of ``model`` in training: ``dtype`` (the compute
    dtype), but fp32 for the modules diffusers keeps in fp32 (:func:`helios.model.weights.keeps_fp32`:
    the time embedder, modulation tables, affine norms)."""
    return {
        name: torch.float32 if keeps_fp32(name) else dtype
        for name, p in model.named_parameters()
        if not p.requires_grad and p.dtype.is_floating_point
    }


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen base weights to their training dtypes (:func:`frozen_dtypes`); trainable ones stay fp32."""
    params = dict(model.named_parameters())
    for name, target in frozen_dtypes(model, dtype).items():
        params[name].data = params[name].data.to(target)
