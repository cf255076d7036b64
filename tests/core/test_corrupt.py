import pytest
import torch

from helios.config import ConfigError
from helios.config.schema import CorruptConfig
from helios.core.corrupt import Branch, down_up, frame_aware_corrupt

PAPER_S3 = dict(
    p_exposure=0.4, p_noise=0.4, p_downsample=0.0, p_clean=0.2, exposure=[0.3, 1.7], noise=[0.0, 0.33]
)


def test_branch_frequencies_per_frame():
    cfg = CorruptConfig(mode="paper", p_exposure=0.1, p_noise=0.5, p_downsample=0.15, p_clean=0.25)
    history = torch.randn(200, 2, 20, 4, 4)
    valid = torch.ones(200, 20, dtype=torch.bool)
    _, branches, _ = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(branches.flatten(), minlength=4).float() / branches.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.5, 0.15, 0.25]), atol=0.015), freq
    # independent per frame: frames of one sample do not share their branch
    assert (branches != branches[:, :1]).any(dim=1).float().mean() > 0.9


def test_reference_mode_decides_once_per_micro_batch_and_noises_the_anchor_too():
    """The released checkpoints' corrupt: one clean / branch decision for the whole micro-batch (clean in
    10 % of micro-batches, the rest noise), noise per sample and frame, the first-frame anchor corrupted like
    a history frame, zero (dropped) frames and a zero anchor (T2V) left at zero."""
    cfg = CorruptConfig()  # the default: mode=reference, noise mode
    history, anchor = torch.ones(4, 2, 6, 4, 4), torch.ones(4, 2, 1, 4, 4)
    history[1, :, :3] = 0
    anchor[2] = 0
    valid = history.flatten(3).abs().amax(dim=(1, 3)) > 0
    clean = 0
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        out, branches, anchor_out = frame_aware_corrupt(history, valid, cfg, gen, anchor, window=3)
        kinds = set(branches[valid].tolist())
        assert len(kinds) == 1  # one decision for the micro-batch
        if kinds == {Branch.CLEAN}:
            clean += 1
            assert torch.equal(out, history) and torch.equal(anchor_out, anchor)
            continue
        assert kinds == {Branch.NOISE}
        assert out[1, :, :3].abs().sum() == 0 and anchor_out[2].abs().sum() == 0  # zero stays zero
        assert not torch.equal(anchor_out[0], anchor[0])  # the anchor is corrupted too
        levels = 1 - out[0].mean(dim=(0, 2, 3))  # per frame: (1 - s) x + s eps on ones -> mean 1 - s
        assert (levels > -0.1).all() and (levels < 0.45).all() and levels.std() > 0.01  # per frame
    assert abs(clean / 300 - 0.1) < 0.05


def test_the_references_noise_is_drawn_in_the_latents_dtype():
    """The reference adds ``torch.randn_like(history)``: bf16 latents get bf16 noise (rounded before the
    mix), then (1 - s) x + s eps per frame; replayed here from the same generator."""
    cfg = CorruptConfig(reference_p_clean=0.0)
    history = torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    valid = torch.ones(2, 3, dtype=torch.bool)
    out, _, _ = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    torch.rand(2, generator=replay)  # the micro-batch's clean / branch draws
    s = (cfg.noise[0] + (cfg.noise[1] - cfg.noise[0]) * torch.rand(6, generator=replay)).view(2, 1, 3, 1, 1)
    eps = torch.randn(history.shape, generator=replay).to(torch.bfloat16)
    want = ((1 - s) * history.float() + s * eps.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_reference_random_mode_down_samples_a_tenth_of_the_corrupted_micro_batches():
    cfg = CorruptConfig(reference_p_noise=0.9)  # stage 3 post: the reference's "random" mode
    history = torch.randn(2, 2, 6, 8, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    kinds = [
        int(frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(s))[1][0, 0])
        for s in range(600)
    ]
    counts = {k: kinds.count(k) / 600 for k in (Branch.CLEAN, Branch.NOISE, Branch.DOWNSAMPLE)}
    assert abs(counts[Branch.CLEAN] - 0.1) < 0.04 and abs(counts[Branch.DOWNSAMPLE] - 0.09) < 0.04


def test_saturation_of_the_generators_history_is_the_references():
    """Stage 3: each history region (the oldest H mod window frames, then windows) holding content is kept
    with p_clean, else scaled around the per-position channel mean by one factor from [0.3, 1) or (1, 1.7]."""
    from helios.config.schema import SaturationConfig
    from helios.core.corrupt import reference_regions, saturate

    assert reference_regions(19, 9) == [(0, 1), (1, 10), (10, 19)] and reference_regions(7, 3) == [
        (0, 1),
        (1, 4),
        (4, 7),
    ]
    history = torch.randn(2, 4, 7, 3, 3)
    history[:, :, :1] = 0  # the oldest region dropped
    valid = history.flatten(3).abs().amax(dim=(1, 3)) > 0
    cfg = SaturationConfig(enabled=True)
    for seed in range(20):
        out = saturate(history, valid, cfg, torch.Generator().manual_seed(seed), window=3)
        assert out[:, :, :1].abs().sum() == 0
        for start, end in [(1, 4), (4, 7)]:
            x, y = history[:, :, start:end], out[:, :, start:end]
            mean = x.mean(dim=1, keepdim=True)
            factor = float(((y - mean) * (x - mean)).sum() / ((x - mean) ** 2).sum())
            torch.testing.assert_close(y, mean + factor * (x - mean))  # one factor for the region
            assert 0.3 <= factor <= 1.7
            torch.testing.assert_close(y.mean(dim=1), x.mean(dim=1))  # the channel mean is kept


def test_saturation_factors_are_even_odds_below_and_above_one_and_uniform_within_the_range():
    """One factor per region: below 1 (uniform on [0.3, 1 - 1e-3]) or above 1 (uniform on [1 + 1e-3, 1.7])
    with even odds, never outside. Channels (1, -1) have mean 0, so a region's output is its factor."""
    from helios.config.schema import SaturationConfig
    from helios.core.corrupt import saturate

    n = 6000
    history = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1).repeat(1, 1, n, 1, 1)
    valid = torch.ones(1, n, dtype=torch.bool)
    cfg = SaturationConfig(enabled=True, p_clean=0.0)
    factors = saturate(history, valid, cfg, torch.Generator().manual_seed(0), window=1)[
        0, 0, :, 0, 0
    ].double()
    below, above = factors[factors < 1], factors[factors > 1]
    assert len(below) + len(above) == n and abs(len(below) / n - 0.5) < 0.02
    eps = 1e-6  # float32 storage
    assert 0.3 - eps <= float(below.min()) and float(below.max()) <= 1 - 1e-3 + eps
    assert 1 + 1e-3 - eps <= float(above.min()) and float(above.max()) <= 1.7 + eps
    assert float(below.mean()) == pytest.approx((0.3 + 0.999) / 2, abs=0.01)
    assert float(above.mean()) == pytest.approx((1.001 + 1.7) / 2, abs=0.01)


def test_invalid_frames_stay_zero_and_clean():
    cfg = CorruptConfig(
        mode="paper", p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.2, 0.3]
    )
    history = torch.randn(4, 2, 5, 4, 4)
    history[:, :, :2] = 0
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[:, :2] = False
    out, branches, _ = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    assert out[:, :, :2].abs().sum() == 0
    assert (branches[:, :2] == Branch.CLEAN).all() and (branches[:, 2:] == Branch.NOISE).all()


def test_noise_level_statistics():
    cfg = CorruptConfig(
        mode="paper", p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.1, 0.3]
    )
    history = torch.zeros(1, 16, 400, 16, 16)
    valid = torch.ones(1, 400, dtype=torch.bool)
    out, _, _ = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    per_frame_std = out[0].std(dim=(0, 2, 3))  # = sigma of that frame (x0 = 0)
    assert per_frame_std.min() > 0.09 and per_frame_std.max() < 0.31
    assert abs(per_frame_std.mean().item() - 0.2) < 0.01


def test_noise_branch_shrinks_the_frame_before_adding_noise():
    """The noise branch is (1 - s) x + s eps (§3.2.3): on a history of ones with s = 0.3 every frame's mean is
    0.7 and its spread 0.3 (the x0 = 0 test above cannot see the (1 - s) factor)."""
    cfg = CorruptConfig(
        mode="paper", p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.3, 0.3]
    )
    history = torch.ones(1, 4, 50, 8, 8)
    out, _, _ = frame_aware_corrupt(history, torch.ones(1, 50, dtype=torch.bool), cfg, torch.Generator())
    assert out.mean().item() == pytest.approx(0.7, abs=0.01)
    assert out.std().item() == pytest.approx(0.3, abs=0.01)


def test_exposure_scales_around_the_per_position_channel_mean():
    """The paper's exposure branch is the reference's saturation operator: (x - m) a + m, m the mean over the
    channels at each position."""
    cfg = CorruptConfig(
        mode="paper", p_exposure=1.0, p_noise=0.0, p_downsample=0.0, p_clean=0.0, exposure=[1.5, 1.5]
    )
    history = torch.randn(1, 3, 2, 8, 8) + 2
    out, _, _ = frame_aware_corrupt(history, torch.ones(1, 2, dtype=torch.bool), cfg, torch.Generator())
    mean = history.mean(dim=1, keepdim=True)
    assert torch.allclose(out, mean + 1.5 * (history - mean), atol=1e-5)


def test_down_up_blurs_and_keeps_shape():
    frame = torch.randn(4, 16, 16)
    out = down_up(frame, 0.5)
    assert out.shape == frame.shape
    assert out.std() < frame.std()  # high frequencies removed
    assert torch.equal(down_up(frame, 0.0), frame)


def test_disabled_is_identity():
    history = torch.randn(2, 2, 3, 4, 4)
    out, branches, _ = frame_aware_corrupt(
        history, torch.ones(2, 3, dtype=torch.bool), CorruptConfig(enabled=False), torch.Generator()
    )
    assert torch.equal(out, history) and (branches == Branch.CLEAN).all()


def test_probabilities_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        CorruptConfig(mode="paper", p_exposure=0.2, p_noise=0.8, p_downsample=0.1, p_clean=0.1).validate(
            "history.corrupt."
        )
    with pytest.raises(ConfigError, match=r"history\.corrupt\.noise"):
        CorruptConfig(noise=[0.5, 0.2]).validate("history.corrupt.")


def test_down_up_shrinks_height_and_width_by_the_same_factor():
    """Down-up (§3.2.3) on a non-square frame: the same ``1 - reduction`` on both sides, then back."""
    import torch.nn.functional as F

    frame = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(0))
    small = F.interpolate(frame[None], size=(4, 10), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(small, size=(8, 20), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(down_up(frame, 0.5), expected)


def test_branches_follow_the_given_generator_not_the_global_stream():
    from helios.core.corrupt import draw_branches

    cfg = CorruptConfig(
        enabled=True, mode="paper", p_exposure=0.25, p_noise=0.25, p_downsample=0.25, p_clean=0.25
    )
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(draw_branches((4, 16), cfg, torch.Generator().manual_seed(7)))
    assert torch.equal(draws[0], draws[1])
    # and every level of every branch (the down-sampling reductions too): a rank's corrupt is its stream's
    history, valid = torch.randn(4, 2, 16, 8, 8), torch.ones(4, 16, dtype=torch.bool)
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        outs.append(frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(7))[0])
    assert torch.equal(outs[0], outs[1])


def _down_up_writes_its_reduction(monkeypatch) -> list[float]:
    """``down_up`` replaced by one that fills the frame with its reduction; returns the reductions it got."""
    from helios.core import corrupt

    calls: list[float] = []

    def down_up(frame: torch.Tensor, reduction: float) -> torch.Tensor:
        calls.append(reduction)
        return torch.full_like(frame, reduction)

    monkeypatch.setattr(corrupt, "down_up", down_up)
    return calls


def test_the_references_down_up_draws_one_reduction_per_region_and_resamples_each_frame_once(monkeypatch):
    """The reference's down-up branch: one reduction drawn per history region (:func:`reference_regions`),
    applied to that region's frames only, each frame resampled once from its clean value."""
    from helios.core import corrupt

    calls = _down_up_writes_its_reduction(monkeypatch)
    cfg = CorruptConfig(mode="reference", reference_p_clean=0.0, reference_p_noise=0.0, downsample=[0.0, 0.5])
    history, valid = torch.randn(1, 2, 7, 4, 4), torch.ones(1, 7, dtype=torch.bool)
    out, _, _ = corrupt.frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0), window=3)
    assert len(calls) == 7  # one per frame
    frames = out[0, 0, :, 0, 0].tolist()
    regions = corrupt.reference_regions(7, 3)
    assert [frames[s:e] for s, e in regions] == [[frames[s]] * (e - s) for s, e in regions]
    assert len({frames[s] for s, _ in regions}) == len(regions)  # a reduction of its own per region
    for seed in (1, 2):  # the global stream moved: the reductions follow the given generator alone
        torch.manual_seed(seed)
        again, _, _ = corrupt.frame_aware_corrupt(
            history, valid, cfg, torch.Generator().manual_seed(0), window=3
        )
        assert torch.equal(again, out)


def test_with_an_anchor_the_references_down_up_gives_the_anchor_a_region_before_the_history(monkeypatch):
    """The reference's frame order puts the anchor first: it is a region of its own, and the history's
    regions (:func:`reference_regions`) follow it shifted by one frame, every history frame resampled."""
    from helios.core import corrupt

    calls = _down_up_writes_its_reduction(monkeypatch)
    cfg = CorruptConfig(mode="reference", reference_p_clean=0.0, reference_p_noise=0.0, downsample=[0.0, 0.5])
    history, valid = torch.randn(1, 2, 7, 4, 4) + 5, torch.ones(1, 7, dtype=torch.bool)
    anchor = torch.randn(1, 2, 1, 4, 4) + 5
    gen = torch.Generator().manual_seed(0)
    out, _, new_anchor = corrupt.frame_aware_corrupt(history, valid, cfg, gen, anchor, window=3)
    assert len(calls) == 8  # the anchor and each history frame, once
    frames = out[0, 0, :, 0, 0].tolist()
    regions = corrupt.reference_regions(7, 3)
    assert [frames[s:e] for s, e in regions] == [[frames[s]] * (e - s) for s, e in regions]
    assert all(0.0 <= f <= 0.5 for f in frames)  # every history frame resampled (clean values are ~5)
    assert 0.0 <= float(new_anchor[0, 0, 0, 0, 0]) <= 0.5
    assert len({float(new_anchor[0, 0, 0, 0, 0]), *(frames[s] for s, _ in regions)}) == len(regions) + 1
