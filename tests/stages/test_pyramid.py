"""Stage 2: token accounting, renoise variance, an exact-velocity toy problem, tiny runs."""

import math

import pytest
import torch

from helios.config import compose
from helios.core.history import HistoryLayout
from helios.core.pyramid import PyramidSchedule, double_nearest
from helios.model.transformer import build_transformer
from helios.sampling.section import Guidance, SectionSampler, block_noise, renoise_coefficients
from tests.helpers.runs import train_in_process as _train

REAL = ["model.transformer.path=/m", "data.path=/d"]


def _tokens(conv: torch.nn.Module, x: torch.Tensor, kernel=None) -> int:
    from diffusers.models.transformers.transformer_helios import pad_for_3d_conv

    if kernel is not None:
        x = pad_for_3d_conv(x, kernel)
    return conv(x).flatten(2).shape[-1]


def test_token_accounting_at_384x640_from_model_inputs():
    cfg = compose(["stage=2", "stage2=init", *REAL])
    model = build_transformer(compose([]).model.transformer)  # tiny widths, the 14B patch geometry
    schedule = PyramidSchedule(cfg.pyramid.stages, cfg.pyramid.gamma)
    target = torch.zeros(1, 16, 9, 48, 80)  # one section at 384x640
    with torch.no_grad():
        single = _tokens(model.patch_embedding, target)
        per_stage = [
            _tokens(model.patch_embedding, schedule.endpoints(target, target, k)[0]) for k in range(3)
        ]
        assert single == 8640 and per_stage == [540, 2160, 8640]
        assert sum(per_stage) / (3 * single) == pytest.approx(7 / 16)  # paper: 2.29x fewer noisy tokens
        layout = HistoryLayout.from_config(cfg.history)
        history, anchor = torch.zeros(1, 16, 19, 48, 80), torch.zeros(1, 16, 1, 48, 80)
        inputs = layout.model_inputs(history, anchor)
        multi = (
            _tokens(model.patch_short, inputs["latents_history_short"])
            + _tokens(model.patch_mid, inputs["latents_history_mid"], (2, 4, 4))
            + _tokens(model.patch_long, inputs["latents_history_long"], (4, 8, 8))
        )
        naive_inputs = HistoryLayout(16, 2, 1, 9, multi_term=False).model_inputs(history, anchor)
        naive = _tokens(model.patch_short, naive_inputs["latents_history_short"])
    hw = 48 * 80
    assert (multi, naive) == (2400, 19200)
    assert multi == 5 / 8 * hw and naive == 5 * hw  # paper §4.1: 5HW -> 5/8 HW


def test_stage_levels_match_the_scheduler_and_the_reference():
    s = PyramidSchedule()
    assert [round(s.start_sigma(k), 3) for k in range(3)] == [0.999, 0.8, 0.5]
    assert [round(s.end_sigma(k), 3) for k in range(3)] == [0.666, 0.334, 0.0]
    assert [tuple(round(t) for t in s.window(k)) for k in range(3)] == [(999, 744), (743, 386), (386, 1)]


@pytest.mark.parametrize("k", [1, 2])
def test_renoise_keeps_the_marginal_consistent_across_the_upsample(k):
    """End of stage k-1 (noise part e * eps), nearest 2x up, then alpha * x + beta * block noise:
    the noise becomes i.i.d. with std s_k and the signal coefficient 1 - s_k, as the training start."""
    s = PyramidSchedule()
    e, s_k = s.end_sigma(k - 1), s.start_sigma(k)
    alpha, beta = renoise_coefficients(s.scheduler.ori_start_sigmas[k], s.gamma)
    assert alpha * (1 - e) == pytest.approx(1 - s_k, abs=1e-3)
    gen = torch.Generator().manual_seed(k)
    eps = torch.randn(20000, 1, 1, 1, 1, generator=gen)
    x = alpha * double_nearest(e * eps) + beta * block_noise((20000, 1, 1, 2, 2), s.gamma, gen)
    blocks = x.reshape(20000, 4)
    cov = blocks.T @ blocks / blocks.shape[0]
    torch.testing.assert_close(cov, s_k**2 * torch.eye(4), atol=0.03, rtol=0)


def _linear_maps(schedule: PyramidSchedule, k: int, shape: tuple[int, ...]):
    """(start, end) of stage k are linear in (x0, eps): return their matrices."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    zero = torch.zeros_like(basis)
    ms, me = (t.reshape(d, -1).T for t in schedule.endpoints(basis, zero, k))
    ns, ne = (t.reshape(d, -1).T for t in schedule.endpoints(zero, basis, k))
    return ms, me, ns, ne


def test_pyramid_sampler_driven_by_the_exact_velocity_lands_on_the_data_distribution():
    """Gaussian data on an 8x8 latent: the exact velocity E[start - end | x_t] of the training path is
    linear; driving the 3-stage Pyramid UniPC sampler with it must reproduce the data mean and
    covariance (tolerance: 0.1 on the mean, 0.1 on covariance entries of size ~1, for 8000 samples;
    60 steps per stage keep the integration error below the sampling error: at 20 steps the
    variance comes out ~7 % high)."""
    from diffusers import HeliosScheduler

    torch.manual_seed(0)
    shape = (1, 1, 8, 8)
    d = 64
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)
    sigma_data = torch.exp(-(torch.cdist(pos, pos) ** 2) / 8).double() + 0.05 * torch.eye(
        d, dtype=torch.float64
    )
    mu = (0.5 * torch.sin(pos[:, 0] / 2) + 0.3).double()
    cov_z = torch.block_diag(sigma_data, torch.eye(d, dtype=torch.float64))
    mean_z = torch.cat([mu, torch.zeros(d, dtype=torch.float64)])
    schedule = PyramidSchedule()
    maps = [_linear_maps(schedule, k, shape) for k in range(3)]
    scheduler = HeliosScheduler(use_dynamic_shifting=True)
    sampler = SectionSampler(scheduler, [60, 60, 60], Guidance(1.0))

    def exact_velocity(x, timestep, embeds):
        k = {2: 0, 4: 1, 8: 2}[x.shape[-1]]
        sig = float(scheduler.sigmas[scheduler.step_index or 0])
        ms, me, ns, ne = maps[k]
        a = torch.cat([sig * ms + (1 - sig) * me, sig * ns + (1 - sig) * ne], dim=1)
        b = torch.cat([ms - me, ns - ne], dim=1)
        cxx = a @ cov_z @ a.T
        gain = b @ cov_z @ a.T @ torch.linalg.pinv(cxx, hermitian=True)
        flat = x.double().reshape(x.shape[0], -1)
        v = (b @ mean_z) + (flat - a @ mean_z) @ gain.T
        return v.reshape(x.shape).to(x.dtype)

    n = 8000
    noise = sampler.initial_noise((n, *shape), torch.Generator().manual_seed(1), torch.device("cpu"))
    out = sampler(exact_velocity, noise, torch.zeros(1), None, torch.Generator().manual_seed(2))
    samples = out.reshape(n, d).double()
    assert (samples.mean(0) - mu).abs().max() < 0.1
    emp = torch.cov(samples.T)
    assert (emp - sigma_data).abs().max() < 0.1, (emp - sigma_data).abs().max()


def test_stage2_tiny_run_decreases_and_resumes(tmp_path):
    common = ["stage=2", "trainer.checkpoint_every=3", "trainer.max_steps=6", "seed=2"]
    full = _train(common, tmp_path / "full")
    assert all(math.isfinite(m["loss"]) for m in full)
    assert {"loss_stage0", "loss_stage1", "loss_stage2", "noisy_tokens"} <= set(full[-1])
    # pyramid.stage_draw=every (the reference): each clip at every stage, [1, 2, 1] times, in every step
    assert {tuple(m[f"frac_stage{k}"] for k in range(3)) for m in full} == {(0.25, 0.5, 0.25)}
    # random: the rank-shared stream follows the step, the samples' pyramid stages change from step to step
    drawn = _train([*common, "pyramid.stage_draw=random", "trainer.batch_size=4"], tmp_path / "random")
    assert len({tuple(m[f"frac_stage{k}"] for k in range(3)) for m in drawn}) > 1
    _train([*common, "trainer.max_steps=3"], tmp_path / "split")
    resumed = {m["step"]: m["loss"] for m in _train(common, tmp_path / "split")}
    for m in full[3:]:
        assert resumed[m["step"]] == pytest.approx(m["loss"], rel=1e-6, abs=1e-7)


def test_stage2_overfits_two_clips(tmp_path):
    metrics = _train(
        [
            "stage=2",
            "data.synthetic.num_videos=2",
            "trainer.batch_size=2",
            "trainer.max_steps=150",
            "optim.lr=1e-3",
            "model.lora.enabled=false",
            "trainer.checkpoint_every=0",
            "history.corrupt.enabled=false",
            "seed=3",
        ],
        tmp_path,
    )
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_latent_size_must_fit_the_pyramid(tmp_path):
    message = r"by 16: 4 pyramid stages need it \(choose the resolution or pyramid\.stages accordingly\)"
    with pytest.raises(ValueError, match=message):
        _train(
            ["stage=2", "pyramid.stages=4", "pyramid.stage_ratios=[1,1,1,1]", "trainer.max_steps=1"], tmp_path
        )


def _scheduler_pairs(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, timestep) pairs diffusers' HeliosScheduler feeds the model in pyramid stage ``k`` (dynamic
    shifting by an identity shift: mu = 1, linear), the oracle of the training path's timestep."""
    from diffusers import HeliosScheduler

    scheduler = HeliosScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    scheduler.set_timesteps(n, stage_index=k, mu=1.0)
    return scheduler.sigmas[:-1].float(), scheduler.timesteps.float()


def test_stage2_noisy_input_timestep_and_target_are_the_samplers_path(monkeypatch):
    """Each stage-2 sample sits on the path the Pyramid UniPC sampler integrates: x_t = sigma start_k +
    (1 - sigma) end_k (sigma = 1 at the stage's start), target = start_k - end_k (the sampler's
    x0 = x_t - sigma v lands on end_k), and the timestep is the one diffusers' scheduler pairs with that
    sigma in stage k (t_max at the start, t_min at the end)."""
    from helios.stages import stage2_mid
    from helios.stages.stage2_mid import Stage2Mid

    stage = Stage2Mid(compose(["stage=2"]))  # tiny: uniform sigma, no shift
    n = 4
    pairs = {k: _scheduler_pairs(k, n) for k in range(3)}
    grid = pairs[0][0]  # sigmas 0.999 .. 0, the same in every stage
    assert all(torch.equal(pairs[k][0], grid) for k in range(3))
    monkeypatch.setattr(stage2_mid, "sample_sigmas", lambda m, cfg, gen: grid.repeat(m // n + 1)[:m])
    endpoints = {}
    real_endpoints = stage.schedule.endpoints

    def spy(x0, noise, k):
        endpoints[k] = real_endpoints(x0, noise, k)
        return endpoints[k]

    monkeypatch.setattr(stage.schedule, "endpoints", spy)
    target = torch.randn(24, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    groups, _ = stage.noisy_groups(target, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))
    assert sorted(g.name for g in groups) == ["stage0", "stage1", "stage2"]
    for g in groups:
        k = int(g.name.removeprefix("stage"))
        start, end = endpoints[k]
        sigma = grid.repeat(len(g.index) // n + 1)[: len(g.index)]
        s = sigma.view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(g.x_t, s * start + (1 - s) * end)
        torch.testing.assert_close(g.target, start - end)
        torch.testing.assert_close(g.x_t - s * g.target, end)  # the sampler's x0 step lands on end_k
        expected_t = pairs[k][1].repeat(len(g.index) // n + 1)[: len(g.index)]
        torch.testing.assert_close(g.timestep.float(), expected_t, rtol=0, atol=1e-3)
        assert g.timestep[0] > g.timestep[n - 1]  # sigma 0.999 (start) is the stage's high timestep


def test_pyramid_timestep_is_the_schedulers_in_every_stage():
    """PyramidSchedule.timestep maps sigma to the timestep diffusers' scheduler uses for it per stage."""
    schedule = PyramidSchedule()
    for k in range(3):
        sigma, timestep = _scheduler_pairs(k, 7)
        torch.testing.assert_close(schedule.timestep(k, sigma).float(), timestep, rtol=0, atol=1e-3)


def test_stage_endpoints_are_the_references_formula():
    """start_k = (1 - s_k) Up(Down(x0^k)) + s_k eps^k (stage 0: (1 - s_0) x0^0 + s_0 eps^0) and end_k =
    (1 - e_k) x0^k + e_k eps^k, with x0^k the clean latent bilinearly halved to stage k's scale and eps^k the
    noise halved and scaled by 2 per halving (the reference's utils_helios_base), computed here by hand."""
    import torch.nn.functional as F

    def halve(x):  # bilinear 1/2 of [B, C, T, H, W], frame by frame
        b, c, t, h, w = x.shape
        y = F.interpolate(
            x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), size=(h // 2, w // 2), mode="bilinear"
        )
        return y.reshape(b, t, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)

    def up(x):
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    schedule = PyramidSchedule()
    x0, eps = torch.randn(2, 3, 2, 16, 16), torch.randn(2, 3, 2, 16, 16)
    for k in range(3):
        x0_k, eps_k = x0, eps
        for _ in range(2 - k):
            x0_k, eps_k = halve(x0_k), halve(eps_k) * 2
        s, e = schedule.start_sigma(k), schedule.end_sigma(k)
        coarse = up(halve(x0_k)) if k > 0 else x0_k
        start, end = schedule.endpoints(x0, eps, k)
        torch.testing.assert_close(start, (1 - s) * coarse + s * eps_k)
        torch.testing.assert_close(end, (1 - e) * x0_k + e * eps_k)


def test_every_clip_trains_every_stage_as_the_reference():
    """pyramid.stage_draw=every (the reference's prepare_stage2_clean_input): each clip at stage k
    stage_ratios[k] times, each time with its own sigma but the clip's one noise (so the replicates of a
    stage share their target), and the loss is the mean over the stage-samples; the global batch counts
    stage-samples (2-post: 192 = 1 clip x 3 stages x 64 GPUs)."""
    from helios.infra.resolve import resolve_grad_accum
    from helios.stages.stage2_mid import Stage2Mid

    stage = Stage2Mid(compose(["stage=2"]))  # tiny: ratios [1, 2, 1]
    target = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    groups, stats = stage.noisy_groups(
        target, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    )
    assert [(g.name, g.index.tolist()) for g in groups] == [
        ("stage0", [0, 1]), ("stage1", [0, 0, 1, 1]), ("stage2", [0, 1])
    ]  # fmt: skip
    stage1 = groups[1]
    torch.testing.assert_close(stage1.target[0], stage1.target[1])  # one clip, one noise
    assert not torch.equal(stage1.target[0], stage1.target[2])  # two clips
    assert stage1.timestep[0] != stage1.timestep[1]  # each replicate its own sigma
    assert (stats["frac_stage0"], stats["frac_stage1"], stats["frac_stage2"]) == (0.25, 0.5, 0.25)

    post = ["stage=2", "stage2=post", "init_from=/x", "model=wan14b", "model.transformer.path=/x", "data=/d"]
    assert resolve_grad_accum(compose(post), 64) == 1 and resolve_grad_accum(compose(post), 8) == 8
    assert resolve_grad_accum(compose([*post, "pyramid.stage_draw=random", "trainer.batch_size=3"]), 8) == 8
    with pytest.raises(Exception, match=r"global_batch_size.*x 3 stage-samples per clip"):
        resolve_grad_accum(compose(post), 5)
    with pytest.raises(Exception, match=r"pyramid\.stage_ratios.*whole numbers"):
        compose(["stage=2", "pyramid.stage_ratios=[1,1.5,1]"])
    compose(["stage=2", "pyramid.stage_ratios=[1,1.5,1]", "pyramid.stage_draw=random"])


def test_the_stage2_loss_is_the_mean_over_stage_samples(monkeypatch):
    """Stage1Base weighs each group by its share of the stage-samples (the reference's NaViT-packed mean)."""
    from helios.stages.stage1_base import NoisyGroup
    from helios.stages.stage2_mid import Stage2Mid

    stage = Stage2Mid(compose(["stage=2"]))
    x, x3 = torch.zeros(1, 4, 3, 8, 8), torch.zeros(3, 4, 3, 8, 8)
    groups = [NoisyGroup(torch.tensor([0]), x, torch.zeros(1), x + 1.0, "stage0"),
              NoisyGroup(torch.tensor([0, 0, 0]), x3, torch.zeros(3), x3 + 3.0, "stage1")]  # fmt: skip
    monkeypatch.setattr(stage, "condition", lambda batch, gen: ({}, x, {}))
    monkeypatch.setattr(stage, "noisy_groups", lambda *a: (groups, {}))
    model = lambda hidden_states, **_: (torch.zeros_like(hidden_states, requires_grad=True),)  # noqa: E731
    losses, _ = stage.forward_backward(model, None, torch.Generator(), step=0)
    assert float(losses["model"]) == pytest.approx((1 * 1.0 + 3 * 9.0) / 4)


def test_the_random_draw_follows_the_ratios_and_the_shared_stream():
    """pyramid.stage_draw=random (Eq. 7): one stage per clip, drawn with replacement in proportion to the
    ratios from the rank-shared generator (the same draw on every rank; another state, another draw)."""
    from helios.stages.stage2_mid import Stage2Mid

    stage = Stage2Mid(compose(["stage=2", "pyramid.stage_draw=random"]))  # ratios [1, 2, 1]
    clip_of, stage_of = stage.stage_samples(4000, torch.Generator().manual_seed(0))
    assert clip_of.tolist() == list(range(4000))
    freq = torch.bincount(stage_of, minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), atol=0.03)
    target = torch.randn(8, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def groups(seed: int) -> list[tuple[str, list[int]]]:
        made, _ = stage.noisy_groups(
            target, torch.Generator().manual_seed(5), torch.Generator().manual_seed(seed)
        )
        return [(g.name, g.index.tolist()) for g in made]

    assert groups(6) == groups(6) != groups(7)


def test_a_latent_the_pyramid_cannot_halve_is_refused_and_shift_uses_the_stage_tokens():
    from helios.stages.stage2_mid import Stage2Mid

    gens = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    stage = Stage2Mid(compose(["stage=2"]))
    with pytest.raises(ValueError, match="latent size 16x12 is not divisible by 8"):
        stage.noisy_groups(torch.zeros(1, 4, 3, 16, 12), *gens)
    four = Stage2Mid(compose(["stage=2", "pyramid.stages=4", "pyramid.stage_ratios=[1,1,1,1]"]))
    with pytest.raises(ValueError, match="latent size 24x24 is not divisible by 16"):
        four.noisy_groups(torch.zeros(1, 4, 3, 24, 24), *gens)
    shifted = Stage2Mid(compose(["stage=2", "flow.shift.enabled=true"]))
    made, _ = shifted.noisy_groups(torch.zeros(1, 4, 3, 16, 16), *gens)
    assert [g.name for g in made] == ["stage0", "stage1", "stage2"]


def test_without_a_shared_stream_the_random_stage_draw_comes_from_the_ranks_generator():
    """A step called without the rank-shared stream (a tool, a test) draws its pyramid stages from the
    generator it is given, so the same generator state draws the same stages."""
    from helios.data.dataset import ClipBatch
    from helios.stages import Stage2Mid

    stage = Stage2Mid(compose(["stage=2", "pyramid.stage_draw=random"]))
    b = 16
    batch = ClipBatch(
        torch.randn(b, 16, 10, 8, 8), torch.randn(b, 16, 1, 8, 8), torch.randn(b, 32, 32), torch.zeros(b),
        torch.full((b,), 7),
    )  # fmt: skip
    model = lambda hidden_states, **_: (torch.zeros_like(hidden_states, requires_grad=True),)  # noqa: E731
    draws = []
    for seed in range(2):
        torch.manual_seed(seed)  # the global stream differs between the two calls
        _, stats = stage.forward_backward(model, batch, torch.Generator().manual_seed(0), step=0)
        draws.append([stats[f"frac_stage{k}"] for k in range(3)])
    assert draws[0] == draws[1]
