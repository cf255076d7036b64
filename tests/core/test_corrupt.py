import pytest
import torch

from helios.config import ConfigError
from helios.config.schema import CorruptConfig
from helios.core.corrupt import Branch, down_up, frame_aware_corrupt

PAPER_S3 = dict(
    p_exposure=0.4, p_noise=0.4, p_downsample=0.0, p_clean=0.2, exposure=[0.3, 1.7], noise=[0.0, 0.33]
)


def test_branch_frequencies_per_frame():
    cfg = CorruptConfig(p_exposure=0.1, p_noise=0.5, p_downsample=0.15, p_clean=0.25)
    history = torch.randn(200, 2, 20, 4, 4)
    valid = torch.ones(200, 20, dtype=torch.bool)
    _, branches = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(branches.flatten(), minlength=4).float() / branches.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.5, 0.15, 0.25]), atol=0.015), freq
    # independent per frame: frames of one sample do not share their branch
    assert (branches != branches[:, :1]).any(dim=1).float().mean() > 0.9


def test_reference_mode_shares_one_branch_per_sample():
    cfg = CorruptConfig(mode="reference", **PAPER_S3)
    valid = torch.ones(64, 6, dtype=torch.bool)
    _, branches = frame_aware_corrupt(
        torch.randn(64, 2, 6, 4, 4), valid, cfg, torch.Generator().manual_seed(0)
    )
    assert (branches == branches[:, :1]).all()


def test_invalid_frames_stay_zero_and_clean():
    cfg = CorruptConfig(p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.2, 0.3])
    history = torch.randn(4, 2, 5, 4, 4)
    history[:, :, :2] = 0
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[:, :2] = False
    out, branches = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    assert out[:, :, :2].abs().sum() == 0
    assert (branches[:, :2] == Branch.CLEAN).all() and (branches[:, 2:] == Branch.NOISE).all()


def test_noise_level_statistics():
    cfg = CorruptConfig(p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.1, 0.3])
    history = torch.zeros(1, 16, 400, 16, 16)
    valid = torch.ones(1, 400, dtype=torch.bool)
    out, _ = frame_aware_corrupt(history, valid, cfg, torch.Generator().manual_seed(0))
    per_frame_std = out[0].std(dim=(0, 2, 3))  # = sigma of that frame (x0 = 0)
    assert per_frame_std.min() > 0.09 and per_frame_std.max() < 0.31
    assert abs(per_frame_std.mean().item() - 0.2) < 0.01


def test_noise_branch_shrinks_the_frame_before_adding_noise():
    """The noise branch is (1 - s) x + s eps (§3.2.3): on a history of ones with s = 0.3 every frame's mean is
    0.7 and its spread 0.3 (the x0 = 0 test above cannot see the (1 - s) factor)."""
    cfg = CorruptConfig(p_exposure=0.0, p_noise=1.0, p_downsample=0.0, p_clean=0.0, noise=[0.3, 0.3])
    history = torch.ones(1, 4, 50, 8, 8)
    out, _ = frame_aware_corrupt(history, torch.ones(1, 50, dtype=torch.bool), cfg, torch.Generator())
    assert out.mean().item() == pytest.approx(0.7, abs=0.01)
    assert out.std().item() == pytest.approx(0.3, abs=0.01)


def test_exposure_scales_around_channel_mean():
    cfg = CorruptConfig(p_exposure=1.0, p_noise=0.0, p_downsample=0.0, p_clean=0.0, exposure=[1.5, 1.5])
    history = torch.randn(1, 3, 2, 8, 8) + 2
    out, _ = frame_aware_corrupt(history, torch.ones(1, 2, dtype=torch.bool), cfg, torch.Generator())
    mean = history.mean(dim=(3, 4), keepdim=True)
    assert torch.allclose(out, mean + 1.5 * (history - mean), atol=1e-5)


def test_down_up_blurs_and_keeps_shape():
    frame = torch.randn(4, 16, 16)
    out = down_up(frame, 0.5)
    assert out.shape == frame.shape
    assert out.std() < frame.std()  # high frequencies removed
    assert torch.equal(down_up(frame, 0.0), frame)


def test_disabled_is_identity():
    history = torch.randn(2, 2, 3, 4, 4)
    out, branches = frame_aware_corrupt(
        history, torch.ones(2, 3, dtype=torch.bool), CorruptConfig(enabled=False), torch.Generator()
    )
    assert torch.equal(out, history) and (branches == Branch.CLEAN).all()


def test_probabilities_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        CorruptConfig(p_exposure=0.2, p_noise=0.8, p_downsample=0.1, p_clean=0.1).validate("history.corrupt.")
    with pytest.raises(ConfigError, match=r"history\.corrupt\.noise"):
        CorruptConfig(noise=[0.5, 0.2]).validate("history.corrupt.")
