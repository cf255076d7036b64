"""fix_pyramid_pipeline on one pipeline object: its block noise is ours (same law, same generator draws,
no Cholesky factor) and its transformer's output is contiguous (diffusers' CFG-Zero* step calls .view())."""

import json
from types import SimpleNamespace

import pytest
import torch

from helios.sampling.diffusers_compat import EXPORT_INFO, fix_pyramid_pipeline, pipeline_call_arguments
from helios.sampling.section import block_noise


class Transposing(torch.nn.Module):
    def forward(self, x):
        return (x.transpose(-1, -2),)  # non-contiguous, as the DiT's unpatchified output


def test_the_fixed_pipeline_draws_our_block_noise_and_returns_contiguous_outputs():
    pipe = SimpleNamespace(
        scheduler=SimpleNamespace(config=SimpleNamespace(gamma=1 / 3)), transformer=Transposing()
    )
    assert fix_pyramid_pipeline(pipe) is pipe
    noise = pipe.sample_block_noise(1, 16, 2, 8, 8, generator=[torch.Generator().manual_seed(3)])
    expected = block_noise((1, 16, 2, 8, 8), 1 / 3, torch.Generator().manual_seed(3), (2, 2), None)
    assert torch.equal(noise, expected)
    x = torch.randn(2, 3, 4)
    (out,) = pipe.transformer(x)
    assert out.is_contiguous() and torch.equal(out, x.transpose(-1, -2))
    assert out.view(-1).numel() == x.numel()
    # a transformer that returns its output object instead of a tuple (return_dict=True) is left alone
    pipe.transformer.forward = lambda x: SimpleNamespace(sample=x)
    assert pipe.transformer(x).sample is x


def test_stage_timesteps_are_the_ones_sampling_feeds_the_model():
    """SectionSampler.stage_timesteps (what the ODE pairs keep and the rollout trains on) equals what a
    section's sampling gives the model, stage by stage, with and without the doubled first-section
    schedule."""
    from helios.config.schema import SamplerConfig
    from helios.sampling.pipeline import build_section_sampler

    sampler = build_section_sampler(
        SamplerConfig(
            kind="dmd", steps=[2, 2, 2], amplify_first=True, shift_type="linear", guidance_scale=1.0
        ),
        (1, 2, 2),
    )
    for first in (True, False):
        fed: dict[tuple, list[float]] = {}

        def model_fn(x, t, e, fed=fed):
            fed.setdefault(tuple(x.shape), []).append(float(t.reshape(-1)[0]))
            return torch.zeros_like(x)

        gen = torch.Generator().manual_seed(0)
        noise = sampler.initial_noise((1, 16, 3, 16, 16), gen, torch.device("cpu"))
        sampler(model_fn, noise, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), gen, first_section=first)
        assert len(fed) == 3
        for k, (shape, ts) in enumerate(sorted(fed.items(), key=lambda kv: kv[0][-1])):
            expected = sampler.stage_timesteps(k, shape, first_section=first)
            assert ts == [float(int(t)) for t in expected], (k, ts, expected)  # the model gets them floored
        assert len(ts) == (4 if first else 2)


def test_an_exports_pipeline_call_is_its_samplers_settings():
    """What ``helios_export.json`` records for the pipeline's call: the history layout, the steps in the
    pipeline's own argument (one stage: ``num_inference_steps``; pyramid: the per-stage list), the negative
    prompt only where CFG uses it (a null one as the shape of its zero embeddings), and the distilled
    first-section schedule."""
    from helios.config.schema import SamplerConfig
    from helios.sampling.diffusers_compat import call_arguments_for

    unipc = SamplerConfig(kind="unipc", steps=[20], guidance_scale=5.0, negative_prompt="blurry")
    assert call_arguments_for(unipc, [16, 2, 1], 9, (512, 4096)) == {
        "history_sizes": [16, 2, 1],
        "num_latent_frames_per_chunk": 9,
        "guidance_scale": 5.0,
        "negative_prompt": "blurry",
        "num_inference_steps": 20,
    }
    dmd = SamplerConfig(kind="dmd", steps=[2, 2, 2], guidance_scale=1.0, amplify_first=True)
    null = SamplerConfig(kind="unipc", steps=[8], guidance_scale=3.0, negative_prompt=None)
    assert call_arguments_for(null, [4, 2, 1], 3, (32, 16)) == {
        "history_sizes": [4, 2, 1],
        "num_latent_frames_per_chunk": 3,
        "guidance_scale": 3.0,
        "negative_prompt_embeds": {"zeros": [32, 16]},
        "num_inference_steps": 8,
    }
    dmd = SamplerConfig(
        kind="dmd", steps=[2, 2, 2], guidance_scale=1.0, amplify_first=True, negative_prompt=None
    )
    assert call_arguments_for(dmd, [4, 2, 1], 3, (32, 16)) == {
        "history_sizes": [4, 2, 1],
        "num_latent_frames_per_chunk": 3,
        "guidance_scale": 1.0,
        "pyramid_num_inference_steps_list": [2, 2, 2],
        "is_amplify_first_chunk": True,
    }


def test_an_exports_call_arguments_are_read_from_its_info_file(tmp_path):
    call = {"history_sizes": [16, 2, 1], "guidance_scale": 5.0, "pyramid_num_inference_steps_list": [2, 2, 2]}
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"call": call, "stage": 2}))
    assert pipeline_call_arguments(tmp_path) == call
    # zero embeddings (a null negative prompt) come back as a tensor of the call's batch, on its device
    (tmp_path / EXPORT_INFO).write_text(
        json.dumps({"call": {**call, "negative_prompt_embeds": {"zeros": [3, 5]}}})
    )
    zeros = pipeline_call_arguments(tmp_path, batch_size=2, device="meta").pop("negative_prompt_embeds")
    assert zeros.shape == (2, 3, 5) and zeros.is_meta
    assert not pipeline_call_arguments(tmp_path)["negative_prompt_embeds"].any()
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"stage": 2}))  # a LoRA-only export: none
    with pytest.raises(ValueError, match=f"^{tmp_path}: a LoRA-only export .* has no call arguments$"):
        pipeline_call_arguments(str(tmp_path))
