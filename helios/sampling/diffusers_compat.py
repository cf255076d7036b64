"""Sampling an export with diffusers' own pipelines, as the model was trained (docs/operations.md,
"Exports in diffusers").

An export (``python -m helios.export``) records in ``helios_export.json`` the call arguments its pipeline
needs besides the prompt (:func:`pipeline_call_arguments`): diffusers' defaults are the 14B layout (history
[16, 2, 1], 9 latent frames per chunk), which a model trained with another layout does not sample correctly.

Two defects of ``HeliosPyramidPipeline`` (diffusers 0.42) stop stage-2/3 calls; :func:`fix_pyramid_pipeline`
works around both on one pipeline object (no global patching), changing nothing else:

- with CFG (``guidance_scale > 1``) and ``is_cfg_zero_star`` (the stage-2 export's setting) its CFG-Zero*
  step calls ``.view()`` on the transformer's output, which is not contiguous: a RuntimeError on any device.
  The fix makes the output contiguous (the same values).
- its block noise draws through a Cholesky factor of (1+γ)I − γ11ᵀ, which is singular at the default
  γ = 1/3 (one zero eigenvalue, kept off zero by a 1e-8 jitter): LAPACK rejects it on some CPUs
  (LinAlgError). The fix draws the same law without the factorisation (:func:`block_noise`, from the same
  generator).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from helios.sampling.section import block_noise

EXPORT_INFO = "helios_export.json"


def pipeline_call_arguments(export_dir: str | Path, batch_size: int = 1, device=None) -> dict:
    """The keyword arguments an export's diffusers pipeline needs to sample the model as it was trained and
    validated (history layout, steps, guidance, negative prompt, first-section schedule). A null negative
    prompt (zero embeddings) is stored as ``{"zeros": [L, D]}`` and handed over as ``negative_prompt_embeds``
    zeros [batch_size, L, D] on ``device`` (batch_size: prompts x videos per prompt; diffusers encodes the
    empty prompt when neither a negative prompt nor its embeddings are given)."""
    info = json.loads((Path(export_dir) / EXPORT_INFO).read_text())
    if "call" not in info:
        raise ValueError(
            f"{export_dir}: a LoRA-only export or one written before 2026-12-04 has no call arguments"
        )
    call = dict(info["call"])
    if "negative_prompt_embeds" in call:
        call["negative_prompt_embeds"] = torch.zeros(
            batch_size, *call["negative_prompt_embeds"]["zeros"], device=device
        )
    return call


def call_arguments_for(sampler, history_sizes: list[int], window: int, text_shape: tuple[int, int]) -> dict:
    """The pipeline call of a run's validation sampler (:class:`~helios.config.schema.SamplerConfig`);
    ``text_shape``: the prompt embeddings' [max_sequence_length, text_dim] (a null negative's zeros)."""
    call = {
        "history_sizes": list(history_sizes),
        "num_latent_frames_per_chunk": window,
        "guidance_scale": sampler.guidance_scale,
    }
    if sampler.guidance_scale > 1.0 and sampler.negative_prompt is None:
        call["negative_prompt_embeds"] = {"zeros": list(text_shape)}
    elif sampler.guidance_scale > 1.0:
        call["negative_prompt"] = sampler.negative_prompt
    if sampler.kind == "unipc":
        call["num_inference_steps"] = sampler.steps[0]
    else:
        call["pyramid_num_inference_steps_list"] = list(sampler.steps)
    if sampler.kind == "dmd":
        call["is_amplify_first_chunk"] = sampler.amplify_first
    return call


def _contiguous_output(module, inputs, output):
    return (output[0].contiguous(), *output[1:]) if isinstance(output, tuple) else output


def fix_pyramid_pipeline(pipe):
    """``pipe`` (a ``HeliosPyramidPipeline``) with its CFG-Zero* output and Cholesky block noise worked
    around (module docstring); returns ``pipe``. Safe to call once per pipeline object."""

    def sample_block_noise(self, b, c, t, h, w, patch_size=(1, 2, 2), device=None, generator=None):
        if isinstance(generator, list):
            generator = generator[0]
        return block_noise((b, c, t, h, w), self.scheduler.config.gamma, generator, patch_size[1:], device)

    pipe.sample_block_noise = types.MethodType(sample_block_noise, pipe)
    pipe.transformer.register_forward_hook(_contiguous_output)
    return pipe
