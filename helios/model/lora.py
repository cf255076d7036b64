"""LoRA adapters (peft, through diffusers' ``add_adapter``) and the set of trainable parameters."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from helios.config.schema import LoraConfig

ADAPTER_NAME = "default"
MEMORY_PATCHES = ("patch_short", "patch_mid", "patch_long")


def linear_targets(
    model: torch.nn.Module, scope: str = "all-linear", patch_embedding: bool = True
) -> list[str]:
    """``all-linear``: every ``nn.Linear`` whose name has no "norm" (time/text embedders, the adaLN
    projection ``time_proj``, ``proj_out`` and the blocks' attention and FFN), plus the patch embedding
    where ``patch_embedding`` (the reference's switch per phase): the reference code's set, which the
    released checkpoints were trained with (a superset of peft's ``all-linear`` on this model).
    ``blocks``: only the linears inside the DiT blocks."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if scope == "blocks":
        return [n for n in linears if n.startswith("blocks.")]
    return [n for n in linears if "norm" not in n] + (
        ["patch_embedding"] if patch_embedding and hasattr(model, "patch_embedding") else []
    )


def resolve_targets(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    if cfg.targets in ("all-linear", "blocks"):
        targets = linear_targets(model, cfg.targets, cfg.patch_embedding)
    else:
        suffixes = tuple(cfg.targets)
        targets = [n for n, m in model.named_modules() if n.endswith(suffixes) and n]
        if not targets:
            raise ValueError(f"model.lora.targets={list(suffixes)} matches no module of the transformer")
    if cfg.memory_patch == "lora":
        targets += [p for p in MEMORY_PATCHES if hasattr(model, p)]
    return targets


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Freeze the base, add LoRA to the configured targets, then unfreeze the parameters that
    train in full (memory-patch convs when ``memory_patch=full``, ``extra_trainable`` names)."""
    model.requires_grad_(False)
    if cfg.enabled:
        peft_cfg = PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=resolve_targets(model, cfg),
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        )
        model.add_adapter(peft_cfg, adapter_name=ADAPTER_NAME)
    else:  # full fine-tuning of the DiT
        model.requires_grad_(True)
    if cfg.memory_patch == "full":
        for name in MEMORY_PATCHES:
            if hasattr(model, name):
                getattr(model, name).requires_grad_(True)
    for name, param in model.named_parameters():
        if any(s in name for s in cfg.extra_trainable):
            param.requires_grad_(True)
    for param in model.parameters():  # trainable params in fp32 (master weights)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def lora_inputs_uncast(model: torch.nn.Module, autocast: bool):
    """Under bf16 autocast, LoRA layers take the bf16 activation as it is: peft otherwise casts it to the
    fp32 LoRA weight's dtype, and autocast casts it back, which stores a second copy of every adapted
    layer's input for the backward (same values: bf16 -> fp32 -> bf16 is exact). Outside autocast (fp32
    runs, sampling) peft's casting stays on."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=autocast)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its name in the (unwrapped) model: LoRA and full-trained weights."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load tensors saved by :func:`trainable_state_dict`; every trainable name must be present.
    ``strict=False``: tensors of roles this model does not have (e.g. stage 3's critic) are skipped."""
    params = dict(model.named_parameters())
    if not strict:
        state = {k: v for k, v in state.items() if k in params}
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(
            "checkpoint does not match the configured trainable parameters "
            f"(missing {missing[:5]}, unknown {unknown[:5]}); "
            "check model.lora.* against the run that saved it"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain-model state dict with every LoRA update merged into its base weight (and the
    fully trained tensors, e.g. memory-patch convs, as they are). Modifies ``model`` in place."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out
