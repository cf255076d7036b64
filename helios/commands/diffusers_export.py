"""``python -m helios.export checkpoint=PATH output=DIR``: a training checkpoint -> diffusers format.

Default: LoRA merged into the base, written as a complete pipeline directory (transformer, scheduler,
VAE, text encoder, tokenizer, ``model_index.json``) that ``HeliosPipeline`` (stage 1) or
``HeliosPyramidPipeline`` (stages 2-3) load with ``from_pretrained``. ``lora_only=true`` writes only the
adapters in the diffusers LoRA format (``pytorch_lora_weights.safetensors``, for ``load_lora_weights``)
plus ``helios_full_weights.safetensors`` with the tensors trained in full (memory-patch convs), so
every trained parameter round-trips. ``weights=ema`` exports the EMA weights where the checkpoint has
them (stage 3).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from helios.config.schema import ExportConfig, TrainConfig
from helios.loading import load_checkpoint_model
from helios.model.encoders import build_text_encoder, build_vae
from helios.model.lora import merged_state_dict
from helios.sampling.diffusers_compat import call_arguments_for
from helios.sampling.pipeline import build_section_sampler

log = logging.getLogger("helios.export")


def scheduler_for(cfg: TrainConfig):
    """The scheduler matching the stage's sampler (validation settings of the run)."""

    return build_section_sampler(cfg.validation.sampler).scheduler


def pipeline_class(cfg: TrainConfig):
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    return HeliosPipeline if cfg.validation.sampler.kind == "unipc" else HeliosPyramidPipeline


def full_trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors that are not LoRA factors (trained in full), by their plain-model name."""
    return {
        n.replace(".base_layer.", "."): p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    }


def export(cfg: ExportConfig) -> Path:
    from diffusers import HeliosPipeline, HeliosTransformer3DModel

    final = Path(cfg.output)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not cfg.overwrite:
        raise ValueError(
            f"output={final} is not empty: export into a new folder, or overwrite=true to replace it "
            "(an export is never mixed with other files)"
        )
    model, train_cfg, found = load_checkpoint_model(Path(cfg.checkpoint), cfg.weights)
    out = final.with_name(f"{final.name}.tmp-{os.getpid()}")  # written whole, checked, then renamed
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    info = {
        "checkpoint": str(found),
        "stage": train_cfg.stage,
        "phase": train_cfg.phase,
        "weights": cfg.weights,
        "latent_format": train_cfg.data.latent_format,  # how helios.generate decodes it
    }
    if cfg.lora_only:
        from peft.utils import get_peft_model_state_dict

        if not train_cfg.model.lora.enabled:
            raise ValueError("lora_only=true: this run trained the model in full (model.lora.enabled=false)")
        lora = get_peft_model_state_dict(model, adapter_name="default")
        peft_cfg = model.peft_config["default"].to_dict()
        metadata = {
            k: (sorted(v) if isinstance(v, set) else v)
            for k, v in peft_cfg.items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora")
        }
        HeliosPipeline.save_lora_weights(
            out, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
        )
        full = full_trained_tensors(model)
        if full:
            save_file(full, str(out / "helios_full_weights.safetensors"))
        info.update(
            {
                "format": "lora",
                "rank": train_cfg.model.lora.rank,
                "alpha": train_cfg.model.lora.alpha,
                "full_weights": sorted(full),
            }
        )
    else:
        plain = HeliosTransformer3DModel.from_config(model.config)
        missing, unexpected = plain.load_state_dict(merged_state_dict(model), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"merge left missing {missing[:5]} / unexpected {unexpected[:5]} tensors")
        tokenizer, text_encoder = build_text_encoder(train_cfg.model.text_encoder)
        pipe_cls = pipeline_class(train_cfg)
        extra = {}
        if pipe_cls.__name__ == "HeliosPyramidPipeline":
            sampler = train_cfg.validation.sampler
            extra = {"is_cfg_zero_star": sampler.cfg_zero_star, "is_distilled": sampler.kind == "dmd"}
        pipe = pipe_cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=build_vae(train_cfg.model.vae),
            scheduler=scheduler_for(train_cfg),
            transformer=plain,
            **extra,
        )
        pipe.save_pretrained(out)
        h = train_cfg.history
        info.update(
            {
                "format": "pipeline",
                "pipeline": pipe_cls.__name__,
                "history": {"sizes": h.sizes, "window": h.window},
                # what the pipeline's call needs besides the prompt (diffusers' defaults are the 14B layout)
                "call": call_arguments_for(
                    train_cfg.validation.sampler,
                    h.sizes,
                    h.window,
                    (train_cfg.model.text_encoder.max_sequence_length, plain.config.text_dim),
                ),
            }
        )
    (out / "helios_export.json").write_text(json.dumps(info, indent=2))
    try:
        check_export(out)
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()
    os.replace(out, final)
    log.info("exported %s to %s (%s)", found, final, info["format"])
    if "call" in info:
        print(diffusers_usage(final, info), flush=True)
    return final


def diffusers_usage(path: Path, info: dict) -> str:
    """How to sample the export with diffusers (docs/operations.md "Exports in diffusers")."""
    lines = [
        f"sample it with diffusers ({info['pipeline']}; its call arguments: {path}/helios_export.json):",
        "  import torch",
        "  from diffusers import DiffusionPipeline",
        "  from helios.sampling.diffusers_compat import fix_pyramid_pipeline, pipeline_call_arguments",
        f'  pipe = DiffusionPipeline.from_pretrained("{path}")',
    ]
    if info["pipeline"] == "HeliosPyramidPipeline":
        lines.append("  fix_pyramid_pipeline(pipe)  # diffusers 0.42's CFG-Zero* and block-noise defects")
    lines.append(f'  video = pipe(prompt="...", **pipeline_call_arguments("{path}")).frames[0]')
    return "\n".join(lines)


def check_export(out: Path) -> None:
    """Read back what an export wrote: every JSON parses and every safetensors file has tensors."""
    from safetensors import safe_open

    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    weights = list(out.rglob("*.safetensors"))
    if not weights:
        raise OSError(f"export to {out} wrote no weights")
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise OSError(f"export wrote an empty {path}")
