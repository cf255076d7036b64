import math

import pytest
import torch

from helios.config.schema import FlowConfig, ShiftConfig
from helios.core.flow_matching import flow_pair, sample_sigmas, shift_factor, shift_sigmas, token_count


@pytest.mark.parametrize(
    ("grid", "linear", "exponential"),
    [((9, 48, 80), 1.92, 6.82), ((9, 24, 40), 0.82, 2.28), ((9, 12, 20), 0.55, 1.73)],
)
def test_dynamic_shift_values(grid, linear, exponential):
    seq = token_count(*grid)
    assert shift_factor(seq, ShiftConfig(type="linear")) == pytest.approx(linear, abs=0.005)
    assert shift_factor(seq, ShiftConfig(type="exponential")) == pytest.approx(exponential, abs=0.005)


def test_token_count_real_section():
    assert token_count(9, 48, 80) == 8640  # one section at 384x640 (REFERENCE.md)


def test_exponential_shift_is_capped():
    assert shift_factor(10**6, ShiftConfig(type="exponential", exp_cap=7.0)) == pytest.approx(7.0)
    assert shift_factor(10**6, ShiftConfig(enabled=False)) == 1.0


def test_shift_sigmas_monotone_and_endpoints():
    s = torch.linspace(0, 1, 11)
    out = shift_sigmas(s, 3.0)
    assert out[0] == 0 and out[-1] == 1 and (out[1:] >= s[1:]).all() and (out.diff() > 0).all()


def test_logit_normal_and_uniform_sampling():
    gen = torch.Generator().manual_seed(0)
    ln = sample_sigmas(50_000, FlowConfig(timestep_sampling="logit_normal"), gen)
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item()) < 0.02 and abs(logits.std().item() - 1) < 0.02
    uni = sample_sigmas(50_000, FlowConfig(timestep_sampling="uniform"), gen)
    assert abs(uni.mean().item() - 0.5) < 0.01 and abs(uni.var().item() - 1 / 12) < 0.002


def test_flow_pair_path_and_velocity():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    x_t, v = flow_pair(x0, noise, sigmas)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[2], noise[2])
    # one Euler step along v from sigma to 0 lands on x0
    assert torch.allclose(x_t[1] - 0.5 * v[1], x0[1], atol=1e-6)
    assert math.isclose(float((v - (noise - x0)).abs().max()), 0.0)


def _law(overrides: list[str]) -> tuple[float, float]:
    """(shift at one real section, median sigma) of a phase's training timestep law."""
    from helios.config import compose

    cfg = compose([*overrides, "data=/shards", "model.transformer.path=/m", "distill.teacher=/t"])
    sigmas = sample_sigmas(200_000, cfg.flow, torch.Generator().manual_seed(0))
    shift = shift_factor(token_count(9, 48, 80), cfg.flow.shift)
    return shift, float(shift_sigmas(sigmas, shift).median())


@pytest.mark.parametrize(
    ("phase", "shift", "median"),
    [
        (["stage=1", "stage1=init"], 1.0, 0.5),  # reference: logit-normal(0, 1), no shift
        (["stage=1", "stage1=post"], 1.0, 0.5),
        (["stage=2", "stage2=init"], 1.0, 0.5),  # reference: uniform, no shift
        (["stage=3", "stage3=post"], 1.92, None),  # reference stage 3: linear shift (Wan's 1.92)
    ],
)
def test_phase_timestep_laws_are_the_references(phase, shift, median):
    got_shift, got_median = _law(phase)
    assert got_shift == pytest.approx(shift, abs=0.005)
    if median is not None:
        assert got_median == pytest.approx(median, abs=0.01)
