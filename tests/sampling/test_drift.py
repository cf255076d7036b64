"""The drift report (the paper's Figure 6 statistics): every section's change from the first section."""

import pytest
import torch

from helios.sampling.drift import drift_report


def test_drift_is_measured_from_the_first_section():
    report = drift_report(
        [
            {"saturation": 0.5, "mean_r": 0.2},
            {"saturation": 0.7, "mean_r": 0.1},
            {"saturation": 0.4, "mean_r": 0.2},
        ]
    )
    assert [r["delta_saturation"] for r in report["sections"]] == pytest.approx([0.0, 0.2, -0.1])
    assert [r["delta_mean_r"] for r in report["sections"]] == pytest.approx([0.0, -0.1, 0.0])
    assert report["max_abs_delta"] == pytest.approx({"saturation": 0.2, "mean_r": 0.1})
    assert report["sections"][1]["saturation"] == 0.7  # the statistics themselves are kept


def test_no_sections_is_an_empty_report():
    assert drift_report([]) == {"sections": [], "max_abs_delta": {}}


def test_adaptive_corruption_draws_from_its_own_stream():
    """The adaptive anti-drift corruption (§3.5) is reproducible from its seed, whatever the global stream."""
    import torch

    from helios.sampling.drift import AdaptiveAntiDrift, AdaptiveConfig

    history = torch.randn(2, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    frames = torch.tensor([True, True, False, True, True, True])
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        outs.append(AdaptiveAntiDrift(AdaptiveConfig(enabled=True), seed=3).corrupt(history, frames))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], history)
    assert torch.equal(outs[0][:, :, 2], history[:, :, 2])  # an unselected frame stays as it was


def test_saturation_is_hsv_saturation_of_frames_in_minus_one_to_one():
    """Pure red 1, grey 0, black 0 (no division by its zero maximum), (1, 0, 0) -> RGB (1, 0.5, 0.5): 0.5."""
    from helios.sampling.drift import saturation

    pixels = torch.tensor([[1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]])
    video = pixels.T.reshape(1, 3, 4, 1, 1)  # [B, 3, T, H, W]: one pixel per frame
    assert saturation(video).flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 0.5])


def test_a_section_drifts_only_when_its_mean_and_its_variance_both_move():
    """Eq. 19: drift is a section whose latent mean and variance both leave their EMA by more than the
    thresholds; a shifted mean alone is not drift."""
    from helios.sampling.drift import AdaptiveAntiDrift, AdaptiveConfig

    base = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    drift = AdaptiveAntiDrift(AdaptiveConfig(enabled=True))
    assert not drift.observe(0, base)
    assert not drift.observe(1, base + 2.0)  # the mean moves, the variance does not
    assert drift.observe(2, (base + 2.0) * 3.0)  # both move
    assert drift.events == [2]


def test_section_stats_are_rgb_in_zero_to_one():
    """A section's RGB means and spreads are read on [0, 1] (frames in [-1, 1]): grey 0 is 0.5, and a
    frame half black, half white has mean 0.5 and spread 0.5."""
    from helios.sampling.drift import section_stats

    grey = section_stats(torch.zeros(1, 3, 2, 4, 4))
    assert grey["r_mean"] == 0.5 and grey["g_std"] == 0.0 and grey["saturation"] == 0.0
    video = torch.ones(1, 3, 1, 2, 1)
    video[:, :, :, 0] = -1.0
    half = section_stats(video)
    assert half["b_mean"] == 0.5 and half["b_std"] == pytest.approx(0.5 * 2**0.5)  # sample std of 0 and 1
