"""An export's diffusers pipeline against our sampler, both from what the export stored: the latents of two
sections of one prompt, for comparison by value."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from helios.core.history import HistoryLayout

PROMPT = "a red circle moving right"


def export_and_our_latents(
    export_dir: Path, pipe, cfg, max_sequence_length: int = 512
) -> tuple[torch.Tensor, Callable[[torch.nn.Module], torch.Tensor], dict]:
    """(diffusers' latents from ``pipe`` called with the export's stored call arguments, our sampler's latents
    as a function of a transformer, that call). Our side uses the run's validation sampler ``cfg`` with
    diffusers' shift order and CFG's unconditional input as the call hands it to diffusers: the negative
    prompt's embeddings, or the stored zero embeddings."""
    from helios.model.encoders import encode_prompts
    from helios.sampling import PromptSchedule, sample_video
    from helios.sampling.diffusers_compat import fix_pyramid_pipeline, pipeline_call_arguments
    from helios.sampling.pipeline import build_section_sampler

    call = pipeline_call_arguments(export_dir)
    negative = call.pop("negative_prompt", None)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT], max_sequence_length)
    if negative is not None:  # encoded as diffusers would, handed over as embeddings of the same length
        call["negative_prompt_embeds"] = encode_prompts(
            pipe.tokenizer, pipe.text_encoder, [negative], max_sequence_length
        )
    layout = HistoryLayout.from_config(cfg.history)
    sampler = build_section_sampler(dataclasses.replace(cfg.validation.sampler, shift_order="diffusers"))

    def our_latents(transformer: torch.nn.Module) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        neg = call.get("negative_prompt_embeds")
        schedule = PromptSchedule([(0, cond)])
        return sample_video(transformer.eval(), layout, sampler, schedule, neg, 2, (8, 8), generator).latents

    if cfg.validation.sampler.kind != "unipc":
        fix_pyramid_pipeline(pipe)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=cond,
            height=64,
            width=64,
            num_frames=2 * (4 * (layout.window - 1) + 1),  # two sections
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **call,
        ).frames
    return ref, our_latents, {"negative_prompt": negative, **call}
