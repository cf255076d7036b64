"""Samplers against diffusers, block noise, seamless streaming decode, adaptive sampling, prompts."""

import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler

from helios.config import compose
from helios.config.schema import SamplerConfig
from helios.core.history import HistoryLayout
from helios.data.video import decode_clip
from helios.model.encoders import build_text_encoder, build_vae, encode_prompts
from helios.model.transformer import build_transformer
from helios.sampling import (
    AdaptiveAntiDrift,
    AdaptiveConfig,
    Guidance,
    PromptSchedule,
    SectionSampler,
    StreamingDecoder,
    block_noise,
    sample_video,
    seam_statistic,
)
from helios.sampling.decode import decode_sections_independently, section_frames
from helios.sampling.pipeline import build_section_sampler, generate_video, sections_for
from helios.sampling.section import renoise_coefficients

LAYOUT = HistoryLayout(4, 2, 1, 3)
KW = dict(
    height=64,
    width=64,
    num_frames=27,
    history_sizes=[4, 2, 1],
    num_latent_frames_per_chunk=3,
    output_type="latent",
)


@pytest.fixture(scope="module")
def tiny():
    cfg = compose([])
    transformer = build_transformer(cfg.model.transformer).eval()
    with torch.no_grad():  # a non-trivial output head so that guidance and history matter
        transformer.proj_out.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    vae = build_vae(cfg.model.vae)
    tokenizer, text = build_text_encoder(cfg.model.text_encoder)
    cond = encode_prompts(tokenizer, text, ["a red circle"], 32)
    neg = encode_prompts(tokenizer, text, [""], 32)
    return transformer, vae, tokenizer, text, cond, neg


def _ours(transformer, scheduler, steps, guidance, cond, neg, amplify=False, **conditioning):
    # diffusers' ordering: its pyramid pipeline shifts each stage before the upsample
    sampler = SectionSampler(scheduler, steps, guidance, amplify_first=amplify, shift_after_upsample=False)
    return sample_video(
        transformer,
        LAYOUT,
        sampler,
        PromptSchedule([(0, cond)]),
        neg,
        3,
        (8, 8),
        torch.Generator().manual_seed(0),
        **conditioning,
    ).latents


@pytest.mark.parametrize("skip_first_chunk", [False, True])
def test_stage1_sampler_matches_helios_pipeline(tiny, skip_first_chunk):
    """The Base's sampler gives HeliosPipeline's latents; ``sampler.anchor_from_second_section`` is its
    ``is_skip_first_chunk``: the first two sections as without it, the third anchored on the second
    section's first latent frame."""
    transformer, vae, tok, text, cond, neg = tiny

    def scheduler():
        return HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True)

    pipe = HeliosPipeline(
        tokenizer=tok, text_encoder=text, vae=vae, scheduler=scheduler(), transformer=transformer
    )
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=neg,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        is_skip_first_chunk=skip_first_chunk,
        **KW,
    ).frames
    ours = _ours(
        transformer, scheduler(), [4], Guidance(5.0), cond, neg, anchor_from_second_section=skip_first_chunk
    )
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # bit-exact in practice
    if skip_first_chunk:
        plain = _ours(transformer, scheduler(), [4], Guidance(5.0), cond, neg)
        torch.testing.assert_close(ours[:, :, :6], plain[:, :, :6], rtol=0, atol=0)
        assert (ours[:, :, 6:] - plain[:, :, 6:]).abs().max() > 1e-3  # the third section saw another anchor


def test_the_sampler_config_hands_the_anchor_rule_to_the_loop(tiny, monkeypatch):
    """``generate_video`` passes ``anchor_from_second_section`` from the sampler's config."""
    import helios.sampling.pipeline as pipeline

    transformer, vae, tok, text, _, _ = tiny
    seen = []
    real = pipeline.sample_video
    monkeypatch.setattr(
        pipeline,
        "sample_video",
        lambda *a, **k: seen.append(k["anchor_from_second_section"]) or real(*a, **k),
    )
    for flag in (False, True):
        cfg = SamplerConfig(
            steps=[1], guidance_scale=1.0, negative_prompt="", anchor_from_second_section=flag
        )
        generate_video(
            transformer, vae, tok, text, LAYOUT, cfg, [(0, "a red circle")], 9, 64, 64,
            torch.Generator().manual_seed(0), 32, latent_format="sections",
        )  # fmt: skip
    assert seen == [False, True]


def test_cfg_guides_against_the_configured_unconditional_input(tiny, monkeypatch):
    """``generate_video``'s unconditional input: the negative prompt's embeddings, or zero embeddings when it
    is null (what caption dropout trains), then encoding only the prompts; none without CFG."""
    import inspect

    import helios.sampling.pipeline as pipeline

    transformer, vae, tok, text, _, _ = tiny
    seen, encoded = [], []
    real_sample, real_encode = pipeline.sample_video, pipeline.encode_prompts

    def sample(*a, **k):
        seen.append(inspect.signature(real_sample).bind(*a, **k).arguments["negative"])
        return real_sample(*a, **k)

    monkeypatch.setattr(pipeline, "sample_video", sample)
    monkeypatch.setattr(pipeline, "encode_prompts", lambda *a: encoded.append(a[2]) or real_encode(*a))
    prompt = "a red circle"
    for negative, scale in (("blurry", 3.0), ("", 3.0), (None, 3.0), (None, 1.0)):
        cfg = SamplerConfig(steps=[1], guidance_scale=scale, negative_prompt=negative)
        generate_video(
            transformer, vae, tok, text, LAYOUT, cfg, [(0, prompt)], 9, 64, 64,
            torch.Generator().manual_seed(0), 32, latent_format="sections",
        )  # fmt: skip
    assert encoded == [["a red circle", "blurry"], ["", "a red circle"], [prompt], [prompt]]
    blurry, empty, cond = encode_prompts(tok, text, ["blurry", "", prompt], 32)
    torch.testing.assert_close(seen[0], blurry[None])
    torch.testing.assert_close(seen[1], empty[None])
    assert empty.abs().sum() > 0  # the empty prompt's encoding is not zeros (its end-of-sequence token)
    assert seen[2].shape == cond[None].shape and not seen[2].any()
    assert seen[3] is None


@pytest.fixture
def pyramid_pipeline_patched(monkeypatch, tiny):
    """diffusers' pyramid pipeline with two of its defects worked around: its block noise goes through a
    Cholesky factor that does not exist at gamma=1/3, and its CFG-Zero* calls .view() on the model's
    non-contiguous output. It is given our block-noise draw (same generator stream) instead."""
    transformer = tiny[0]

    def ours(self, b, c, t, h, w, patch_size=(1, 2, 2), device=None, generator=None):
        return block_noise((b, c, t, h, w), self.scheduler.config.gamma, generator, patch_size[1:], device)

    monkeypatch.setattr(HeliosPyramidPipeline, "sample_block_noise", ours)
    hook = transformer.register_forward_hook(
        lambda m, i, o: (o[0].contiguous(),) if isinstance(o, tuple) else o
    )
    yield
    hook.remove()


def test_pyramid_unipc_with_cfg_zero_star_matches_diffusers(tiny, pyramid_pipeline_patched):
    transformer, vae, tok, text, cond, neg = tiny
    pipe = HeliosPyramidPipeline(
        tokenizer=tok,
        text_encoder=text,
        vae=vae,
        transformer=transformer,
        scheduler=HeliosScheduler(use_dynamic_shifting=True),
        is_cfg_zero_star=True,
    )
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=neg,
        pyramid_num_inference_steps_list=[2, 2, 2],
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        **KW,
    ).frames
    ours = _ours(
        transformer,
        HeliosScheduler(use_dynamic_shifting=True),
        [2, 2, 2],
        Guidance(5.0, cfg_zero_star=True),
        cond,
        neg,
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "stage, published",
    [
        ("1", HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True)),
        ("2", HeliosScheduler(stages=3, use_dynamic_shifting=True)),
        ("3", HeliosDMDScheduler(stages=3, use_dynamic_shifting=True, time_shift_type="linear")),
    ],
)
def test_each_stages_sampler_is_the_published_models_scheduler(stage, published):
    """The scheduler a stage's validation sampler builds from its config is the one the published Helios
    directories ship (dynamic shifting by token count on; the distilled model's linear shift), so the parity
    tests above, which build those schedulers directly, hold for what the configs run."""
    built = build_section_sampler(compose([f"stage={stage}"]).validation.sampler).scheduler
    assert type(built) is type(published)
    ignore = {"_use_default_values"}  # diffusers' bookkeeping of which values were given
    assert {k: v for k, v in built.config.items() if k not in ignore} == {
        k: v for k, v in published.config.items() if k not in ignore
    }


def test_cfg_zero_star_keeps_the_predictions_dtype():
    """CFG-Zero*'s scale s* is computed in fp32 and applied in the velocity's dtype: a bf16 transformer's
    guided velocity stays bf16 (an fp32 s* would promote every later sampler step to fp32)."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(2, 4, 3, 5, 5, generator=gen).to(torch.bfloat16) for _ in range(2))
    out = Guidance(5.0, cfg_zero_star=True).combine(cond, uncond, stage=1, step=3)
    c, u = cond.float().flatten(1), uncond.float().flatten(1)
    s = ((c * u).sum(1) / (u * u).sum(1)).view(2, 1, 1, 1, 1).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, uncond * s + 5.0 * (cond - uncond * s), rtol=0, atol=0)


def test_a_sampler_amplifies_its_first_section_only_when_asked():
    """``is_amplify_first_chunk`` (the distilled model's doubled first-section schedule) is off unless the
    sampler is built with it, as in diffusers' pipelines."""
    shape = (1, 16, 3, 8, 8)
    plain = SectionSampler(HeliosDMDScheduler(), [2, 2, 2], Guidance(1.0))
    asked = SectionSampler(HeliosDMDScheduler(), [2, 2, 2], Guidance(1.0), amplify_first=True)
    assert len(plain.stage_timesteps(0, shape, first_section=True)) == 2
    assert len(asked.stage_timesteps(0, shape, first_section=True)) == 4
    assert len(asked.stage_timesteps(0, shape, first_section=False)) == 2
    assert len(asked.stage_timesteps(0, shape)) == 2  # a later section unless told otherwise


def test_the_initial_noise_is_drawn_from_the_generator_and_put_where_the_model_runs():
    """The section's noise comes from the sampling generator on the host (the same noise on any device) and
    is placed on the model's device (meta stands in for the GPU)."""
    sampler = SectionSampler(HeliosDMDScheduler(), [2, 2, 2], Guidance(1.0))
    shape = (1, 4, 2, 8, 8)
    on_host = sampler.initial_noise(shape, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert on_host.shape == (1, 4, 2, 2, 2)  # halved per extra stage: the first stage's resolution
    torch.testing.assert_close(on_host, sampler.initial_noise(shape, torch.Generator().manual_seed(0), "cpu"))
    on_device = sampler.initial_noise(shape, torch.Generator().manual_seed(0), torch.device("meta"))
    assert on_device.device.type == "meta" and on_device.shape == on_host.shape


def test_dmd_few_step_sampler_matches_diffusers(tiny, pyramid_pipeline_patched):
    transformer, vae, tok, text, cond, _ = tiny
    pipe = HeliosPyramidPipeline(
        tokenizer=tok,
        text_encoder=text,
        vae=vae,
        transformer=transformer,
        scheduler=HeliosDMDScheduler(use_dynamic_shifting=True),
        is_distilled=True,
    )
    ref = pipe(
        prompt_embeds=cond,
        pyramid_num_inference_steps_list=[2, 2, 2],
        guidance_scale=1.0,
        is_amplify_first_chunk=True,
        generator=torch.Generator().manual_seed(0),
        **KW,
    ).frames
    ours = _ours(
        transformer,
        HeliosDMDScheduler(use_dynamic_shifting=True),
        [2, 2, 2],
        Guidance(1.0),
        cond,
        None,
        amplify=True,
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_covariance(gamma):
    x = block_noise((8000, 1, 1, 2, 2), gamma, torch.Generator().manual_seed(0))
    blocks = x.reshape(8000, 4)
    cov = blocks.T @ blocks / blocks.shape[0]
    expected = (1 + gamma) * torch.eye(4) - gamma * torch.ones(4, 4)
    torch.testing.assert_close(cov, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_has_the_law_of_diffusers_block_noise(gamma):
    """diffusers' ``HeliosPyramidPipeline.sample_block_noise`` draws through a Cholesky factor of the block
    covariance, which at gamma = 1/3 is singular up to its 1e-8 jitter: LAPACK rejects it on some platforms
    (LinAlgError; why the parity tests draw with ``block_noise``). Where it succeeds, both laws agree."""
    from types import SimpleNamespace

    from diffusers import HeliosPyramidPipeline

    pipe = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=gamma)))
    try:
        theirs = HeliosPyramidPipeline.sample_block_noise(
            pipe, 50000, 1, 1, 2, 2, generator=torch.Generator().manual_seed(1)
        )
    except torch.linalg.LinAlgError:
        assert gamma == 1 / 3  # only the singular covariance may fail
        return
    ours = block_noise((50000, 1, 1, 2, 2), gamma, torch.Generator().manual_seed(0))
    cov = [x.reshape(50000, 4).T @ x.reshape(50000, 4) / 50000 for x in (theirs, ours)]
    torch.testing.assert_close(cov[0], cov[1], atol=0.03, rtol=0)


def test_renoise_coefficients_reference_values():
    a, b = renoise_coefficients(2 / 3, 1 / 3)  # original start sigma of stage 2
    assert (round(a, 3), round(b, 3)) == (0.6, 0.693)
    a, b = renoise_coefficients(1 / 3, 1 / 3)  # ... and of stage 3
    assert (round(a, 3), round(b, 3)) == (0.75, 0.433)


def test_streaming_decode_is_seamless_and_equals_full_decode(tiny):
    vae = tiny[1]
    sections = [torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stream = StreamingDecoder(vae)
    streamed = torch.cat([stream.push(s) for s in sections], dim=2)
    full = StreamingDecoder(vae).push(torch.cat(sections, dim=2))
    assert streamed.shape == (1, 3, 33, 64, 64)  # 4 * (9 - 1) + 1 frames
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    separate = decode_sections_independently(vae, sections)
    torch.testing.assert_close(separate[:, :, :9], streamed[:, :, :9], rtol=0, atol=1e-6)
    assert separate.shape[2] == 27  # each section restarts the causal VAE: 9 frames each, not 9 + 12 + 12
    assert not torch.allclose(separate[:, :, 9:18], streamed[:, :, 9:18])


def test_seam_statistic_flags_a_jump_at_boundaries():
    video = torch.zeros(1, 3, 21, 4, 4)
    video[:, :, 9:] += 0.5  # jump between frames 8 and 9: the boundary after a 9-frame first section
    stats = seam_statistic(video, section_frames=12, first_section_frames=9)
    assert stats["boundary_diff"] == pytest.approx(0.5) and stats["inside_diff"] == 0 and stats["ratio"] > 100


def test_adaptive_detects_a_shift_and_corrupts_only_those_frames():
    adaptive = AdaptiveAntiDrift(AdaptiveConfig(enabled=True, delta_mu=0.15, delta_sigma=0.15))
    base = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not adaptive.observe(0, base)
    assert not adaptive.observe(1, base + 0.01)
    assert adaptive.observe(2, base * 3 + 2)  # mean and variance jump
    assert adaptive.events == [2]
    history = torch.ones(1, 4, 7, 8, 8)
    frames = torch.tensor([False] * 4 + [True] * 3)
    out = adaptive.corrupt(history, frames)
    assert torch.equal(out[:, :, :4], history[:, :, :4]) and not torch.equal(out[:, :, 4:], history[:, :, 4:])


def test_prompt_interpolation_eq20():
    e1, e2 = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 4.0)  # neither zero: both weights count
    schedule = PromptSchedule([(0, e1), (2, e2)], interpolation_steps=3)
    assert [float(schedule(k).mean()) for k in range(6)] == [2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    # switches in any order; the first (after sorting) must start at 0
    assert float(PromptSchedule([(2, e2), (0, e1)])(3).mean()) == 4.0
    for switches in ([(1, e1)], [(0, e1), (-1, e2)], []):
        with pytest.raises(ValueError, match="the first prompt must start at section 0"):
            PromptSchedule(switches)
    with pytest.raises(ValueError, match="section -1: sections count from 0"):
        schedule(-1)


def test_section_frames_follow_the_latent_format():
    """A section of 3 latent frames is 9 pixel frames in the section format (each section encoded alone);
    streamed from whole-clip latents, every section after the first is 12 (4 per latent frame)."""
    assert section_frames(3, "sections") == (9, 9)
    assert section_frames(3, "clip") == (9, 12)
    assert section_frames(9, "clip") == (33, 36)  # the real window


def test_i2v_matches_helios_pipeline_in_the_section_format(tiny):
    """I2V as diffusers' HeliosPipeline (and so as the released checkpoints were meant to be sampled):
    the anchor is the image's single-frame latent, the newest history slot the last latent of the image
    held still for one section; our encoding equals the pipeline's (same generator), and sampling from
    those slots gives its latents."""
    from helios.model.encoders import latent_stats
    from helios.sampling.pipeline import encode_conditioning

    transformer, vae, tok, text, cond, neg = tiny
    image = torch.rand(1, 3, 1, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = encode_conditioning(
        vae, image, None, 3, "sections", torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    pipe = HeliosPipeline(
        tokenizer=tok,
        text_encoder=text,
        vae=vae,
        scheduler=HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True),
        transformer=transformer,
    )
    mean, std = latent_stats(vae)
    anchor, still = pipe.prepare_image_latents(
        image[:, :, 0], mean, 1 / std, 3, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ours.anchor, anchor, rtol=1e-6, atol=1e-5)  # (z - m) / s vs (z - m) * (1 / s)
    torch.testing.assert_close(ours.history, still, rtol=1e-6, atol=1e-5)
    assert (anchor - still).abs().max() > 1e-3  # two different latents of one image
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=neg,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        image_latents=anchor,
        fake_image_latents=still,
        add_noise_to_image_latents=False,
        **KW,
    ).frames
    scheduler = HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True)
    latents = _ours(
        transformer, scheduler, [3], Guidance(5.0), cond, neg, anchor=ours.anchor, history=ours.history
    )
    generated = latents[:, :, 1:]  # after the history slot's latent
    # float32 rounding of differently ordered ops on latents up to ~6 in magnitude (1.6e-5 at most on
    # the 128-wide tiny DiT, in 7 of 9216 values)
    torch.testing.assert_close(generated, ref[:, :, -generated.shape[2] :], rtol=1e-6, atol=5e-5)


@pytest.mark.parametrize("latent_format", ["sections", "clip"])
def test_generate_video_t2v_i2v_v2v_and_adaptive(tiny, latent_format):
    """Frame counts per format: sections decode to 9 frames each (4 sections for 30 frames), streaming
    to 9 + 12k; V2V conditions on whole sections (sections) or the whole clip (clip)."""
    transformer, vae, tok, text, *_ = tiny
    cfg = SamplerConfig(kind="unipc", steps=[2], guidance_scale=3.0)

    def run(**kw):
        return generate_video(
            transformer,
            vae,
            tok,
            text,
            LAYOUT,
            cfg,
            [(0, "a red circle"), (1, "x")],
            30,
            64,
            64,
            torch.Generator().manual_seed(0),
            32,
            **kw,
            latent_format=latent_format,
        )

    sections = {"sections": 4, "clip": 3}[latent_format]
    t2v = run()
    assert t2v.frames.shape == (1, 3, 30, 64, 64) and t2v.stats["sections"] == sections
    assert sections_for(30, 3, latent_format) == sections
    assert sections_for(1, 3, latent_format) == 1  # a single frame still takes one section
    assert len(t2v.stats["drift"]["sections"]) == sections and "ratio" in t2v.stats["seams"]
    i2v = run(image=torch.rand(1, 3, 1, 64, 64) * 2 - 1)
    assert i2v.frames.shape[2] == 31 and i2v.latents.shape[2] == 1 + 3 * sections
    v2v = run(video=torch.rand(1, 3, 13, 64, 64) * 2 - 1)
    cond_frames, cond_latents = {"sections": (9, 3), "clip": (13, 4)}[latent_format]
    assert v2v.frames.shape[2] == cond_frames + 30 and v2v.latents.shape[2] == cond_latents + 3 * sections
    cfg.adaptive.enabled, cfg.adaptive.delta_mu, cfg.adaptive.delta_sigma = True, 0.0, 0.0
    adaptive = run()
    # zero thresholds: every later section
    assert adaptive.stats["adaptive_drift_sections"] == list(range(1, sections))
    assert torch.equal(adaptive.latents[:, :, :6], t2v.latents[:, :, :6])  # nothing corrupted before a drift
    assert not torch.equal(
        adaptive.latents[:, :, 6:], t2v.latents[:, :, 6:]
    )  # corrupted history changed them


def test_streaming_decode_equals_diffusers_decode_on_a_residual_patchified_vae():
    """Wan 2.2's VAE layout (residual up-blocks whose shortcut treats the first chunk apart, patch size 2):
    the streaming decoder starts each stream with its first chunk as diffusers' ``decode`` does."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=16,
        decoder_base_dim=16,
        z_dim=8,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
    ).eval()
    z = torch.randn(1, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(z).sample
    stream = StreamingDecoder(vae)
    for _ in range(2):  # a reset stream starts again from its first chunk
        torch.testing.assert_close(stream.push(z), expected, rtol=0, atol=1e-6)
        stream.reset()


def test_section_decoder_decodes_as_the_format_requires(tiny):
    """sections: each section on its own (diffusers' pipelines); clip: the streaming decode."""
    from helios.sampling.decode import SectionDecoder

    vae = tiny[1]
    sections = [torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    per_section, stream = SectionDecoder(vae, "sections"), SectionDecoder(vae, "clip")
    a = torch.cat([per_section.push(x) for x in sections], dim=2)
    b = torch.cat([stream.push(x) for x in sections], dim=2)
    assert a.shape[2] == 18 and b.shape[2] == 21
    torch.testing.assert_close(a, decode_sections_independently(vae, sections), rtol=0, atol=0)
    torch.testing.assert_close(b, StreamingDecoder(vae).push(torch.cat(sections, dim=2)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"^unknown latent format 'frames'; one of \['clip', 'sections'\]$"):
        SectionDecoder(vae, "frames")


def test_build_section_sampler_kinds():
    assert build_section_sampler(SamplerConfig(kind="unipc", steps=[5])).num_stages == 1
    pyr = build_section_sampler(SamplerConfig(kind="pyramid", steps=[3, 3, 3], cfg_zero_star=True))
    assert pyr.num_stages == 3 and pyr.guidance.cfg_zero_star
    assert build_section_sampler(SamplerConfig(kind="dmd", steps=[2, 2, 2], guidance_scale=1.0)).is_dmd


@pytest.mark.parametrize("kind", ["pyramid", "dmd"])
def test_a_sampler_of_k_stages_splits_the_timesteps_into_k_equal_windows(kind):
    """Two stages (the schedulers' own default is three windows): [0, 1/2, 1]."""
    sampler = build_section_sampler(SamplerConfig(kind=kind, steps=[2, 2], guidance_scale=1.0))
    assert sampler.num_stages == 2 and list(sampler.scheduler.config.stage_range) == [0.0, 0.5, 1.0]
    linear = build_section_sampler(SamplerConfig(kind=kind, steps=[2, 2], shift_type="linear"))
    assert sampler.scheduler.config.time_shift_type == "exponential"
    assert linear.scheduler.config.time_shift_type == "linear"  # the config's, not the scheduler's default


def test_a_sections_progress_line_gives_its_rate():
    from helios.sampling.pipeline import SectionProgress

    line = SectionProgress(section=2, sections=5, seconds=0.5, frames=12, frames_so_far=24).line()
    assert line == "section 2/5: 0.5 s, 12 frames (24.0 frames/s), 24 so far"
    assert "(12000000000.0 frames/s)" in SectionProgress(1, 1, 0.0, 12, 12).line()  # no division by zero


@pytest.mark.parametrize(
    ("order", "grids"),
    [("stage", [(12, 20), (24, 40), (48, 80)]), ("diffusers", [(12, 20), (12, 20), (24, 40)])],
)
def test_each_pyramid_stage_is_shifted_by_its_own_token_count(order, grids, monkeypatch):
    """At 384x640 the reference pipeline (and training) shifts stage k by stage k's grid; diffusers' port
    by the previous stage's (kept as shift_order=diffusers for parity with its pipeline)."""
    import helios.sampling.section as section

    seen = []
    original = section.set_stage_timesteps

    def spy(scheduler, steps, stage, shape, *args, **kwargs):
        seen.append(tuple(shape[-2:]))
        return original(scheduler, steps, stage, shape, *args, **kwargs)

    monkeypatch.setattr(section, "set_stage_timesteps", spy)
    sampler = build_section_sampler(SamplerConfig(kind="pyramid", steps=[1, 1, 1], shift_order=order))
    x = sampler.initial_noise((1, 16, 9, 48, 80), torch.Generator().manual_seed(0), torch.device("cpu"))
    cond = torch.zeros(1, 4, 8)
    sampler(lambda x, t, e: torch.zeros_like(x), x, cond, None, torch.Generator().manual_seed(0))
    assert seen == grids


REFERENCE_DMD_TIMESTEPS = {  # the reference's get_ode-pairs.py: its distilled schedule at 384x640, hard-coded
    True: [
        [998.5342, 902.2183, 833.9636, 783.0660],
        [742.8216, 640.0038, 547.1926, 462.9951],
        [385.4137, 328.6249, 253.9905, 151.5308],
    ],
    False: [[998.5342, 833.9636], [742.8216, 547.1926], [385.4137, 253.9905]],
}


@pytest.mark.parametrize("first_section", [True, False])
def test_distilled_sampler_feeds_the_reference_timesteps_in_our_default_order(first_section):
    """An oracle outside this project and diffusers: the timesteps the released Helios-Distilled was trained
    and sampled on (the reference hard-codes them) are what our DMD sampler feeds the model at 384x640, in
    its default order (each stage shifted by its own token count, after the upsample); diffusers' order
    (before the upsample) feeds other ones."""
    from helios.config.schema import SamplerConfig
    from helios.sampling.pipeline import build_section_sampler

    def timesteps_fed(shift_order: str) -> list[list[float]]:
        cfg = SamplerConfig(kind="dmd", steps=[2, 2, 2], guidance_scale=1.0, amplify_first=True)
        cfg.shift_type, cfg.shift_order = "linear", shift_order
        sampler = build_section_sampler(cfg)
        seen: dict[int, list[float]] = {}

        def model_fn(x, t, e):
            seen.setdefault(x.shape[-1], []).append(float(t[0]))
            return torch.zeros_like(x)

        gen = torch.Generator().manual_seed(0)
        noise = sampler.initial_noise((1, 16, 9, 48, 80), gen, torch.device("cpu"))
        sampler(model_fn, noise, torch.zeros(1), None, torch.Generator().manual_seed(1), first_section)
        return [seen[w] for w in (20, 40, 80)]

    reference = REFERENCE_DMD_TIMESTEPS[first_section]
    ours = timesteps_fed("stage")
    for fed, want in zip(ours, reference):
        assert fed == pytest.approx([float(int(t)) for t in want], abs=1e-6)  # rounded down as fed
    assert timesteps_fed("diffusers")[1:] != ours[1:]


def test_a_video_that_fails_to_write_is_named_with_the_encoders_reason(tmp_path, monkeypatch):
    """``save_video`` reads its mp4 back: a failing encoder raises an OSError that names the file and the
    first line of the encoder's message (its type where the message is empty); a short video says so; a
    video written whole leaves its stats next to it and no temporary file."""
    import json

    import diffusers.utils

    from helios.sampling import pipeline

    frames = torch.zeros(3, 4, 16, 16)
    out = tmp_path / "v.mp4"

    def failing(message: str):
        def export(*args, **kwargs):
            raise RuntimeError(message)

        return export

    for message, reason in (("", "RuntimeError"), ("no encoder\nsecond line", "no encoder")):
        monkeypatch.setattr(diffusers.utils, "export_to_video", failing(message))
        with pytest.raises(OSError, match=rf"^writing {out} failed: {reason}$"):
            pipeline.save_video(frames, out, 8, {"seed": 0})
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "ffmpeg_probe", lambda path: (3, 8.0))
    with pytest.raises(OSError, match=rf"^writing {out} failed: it holds 3 of 4 frames$"):
        pipeline.save_video(frames, out, 8, {"seed": 0})
    monkeypatch.undo()
    # a ramp from dark to light: [-1, 1] maps onto the pixels' range, read back within the codec's error
    frames = torch.linspace(-0.8, 0.8, 16).expand(3, 4, 16, 16).contiguous()
    pipeline.save_video(frames, out, 12, {"seed": 0})
    assert json.loads(out.with_suffix(".json").read_text()) == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.mp4"]
    assert pipeline.ffmpeg_probe(out) == (4, 12.0)  # at the frame rate asked for
    written, _ = decode_clip(str(out), 4, 16, 16)
    assert (written - frames).abs().mean() < 0.05, (written - frames).abs().mean()
    # a sample that overshoots [-1, 1] is clipped to white and black, not wrapped around the 8-bit range
    over = torch.full((3, 4, 16, 16), 2.0)
    over[:, :, :8] = -2.0
    pipeline.save_video(over, out, 12, {"seed": 0})
    written, _ = decode_clip(str(out), 4, 16, 16)
    assert float(written[:, :, 10:].min()) > 0.9 and float(written[:, :, :6].max()) < -0.9


def test_prompts_given_for_one_section_the_later_one_wins():
    e1, e2 = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 4.0)
    assert float(PromptSchedule([(0, e1), (0, e2)])(0).mean()) == 4.0


@pytest.mark.parametrize("kind", ["unipc", "pyramid", "dmd"])
def test_the_samplers_block_noise_gamma_comes_from_the_config(kind):
    from helios.config.schema import SamplerConfig
    from helios.sampling.pipeline import build_section_sampler

    steps = [2] if kind == "unipc" else [2, 2, 2]
    sampler = build_section_sampler(SamplerConfig(kind=kind, steps=steps, gamma=0.25))
    assert sampler.scheduler.config.gamma == 0.25


@pytest.mark.parametrize(("kind", "steps"), [("unipc", [4]), ("pyramid", [2, 2, 2]), ("dmd", [1, 1, 1])])
def test_the_timesteps_are_made_on_the_device_that_samples(kind, steps):
    """Every sampler's schedule is built on the sampling device (a meta device here: no copy per step)."""
    from helios.sampling import section
    from helios.sampling.pipeline import build_section_sampler
    from helios.sampling.section import set_stage_timesteps

    sampler = build_section_sampler(SamplerConfig(kind=kind, steps=steps))
    set_stage_timesteps(sampler.scheduler, steps, 0, (1, 16, 3, 8, 8), device=torch.device("meta"))
    assert sampler.scheduler.timesteps.device.type == "meta"
    # and a sampling run asks for each stage's schedule on its latents' device (meta cannot run diffusers'
    # step, which reads a scalar: the device asked for is recorded on the host instead)
    asked = []

    def recording(*args):
        asked.append(args[-1])
        return set_stage_timesteps(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(section, "set_stage_timesteps", recording)
        x = sampler.initial_noise((1, 16, 3, 8, 8), torch.Generator().manual_seed(0), torch.device("cpu"))
        sampler(lambda x, t, c: torch.zeros_like(x), x, torch.zeros(1, 4, 32), None, None)
    assert asked and all(device == x.device for device in asked)


def test_the_initial_noise_is_float32_whatever_the_default_dtype():
    """A script that sets torch's default dtype (float64 for a numerical check) samples from the same seeded
    noise: float32, as diffusers' pipelines draw it."""
    from helios.sampling.pipeline import build_section_sampler

    sampler = build_section_sampler(SamplerConfig(kind="pyramid", steps=[1, 1, 1]))
    shape, cpu = (1, 16, 3, 8, 8), torch.device("cpu")
    expected = sampler.initial_noise(shape, torch.Generator().manual_seed(0), cpu)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = sampler.initial_noise(shape, torch.Generator().manual_seed(0), cpu)
    finally:
        torch.set_default_dtype(default)
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
