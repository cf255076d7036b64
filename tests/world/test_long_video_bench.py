"""``bench/tiny_long_video.py``'s sampler overrides: what a long-video measurement of the paper's
inference-side mechanisms (Adaptive Sampling, CFG-Zero*) changes, merged into the run's sampler and
validated like the training config."""

from __future__ import annotations

import math

import pytest

from bench.tiny_long_video import override_sampler
from helios.config.schema import SamplerConfig


def test_sampler_overrides_change_only_the_keys_named():
    base = SamplerConfig(steps=[8], guidance_scale=3.0, negative_prompt="")
    changed = override_sampler(
        base, ["adaptive.enabled=true", "adaptive.delta_mu=0.05", "cfg_zero_star=true"]
    )
    assert isinstance(changed, SamplerConfig)
    assert changed.adaptive.enabled and changed.adaptive.delta_mu == 0.05 and changed.cfg_zero_star
    assert changed.adaptive.delta_sigma == 0.15  # the rest as it was
    assert (changed.steps, changed.guidance_scale, changed.negative_prompt) == ([8], 3.0, "")
    assert not base.adaptive.enabled and not base.cfg_zero_star  # the run's sampler untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "adaptive.enabld=true",
            "--sampler adaptive.enabld: unknown key: the schema has no such field (check its spelling)",
        ),
        ("adaptive.rho_mu=2", "--sampler adaptive.rho_mu: must be in (0, 1)"),
        ("kind", "--sampler kind: expected KEY=VALUE (e.g. adaptive.enabled=true)"),
        (
            "guidance_scale=high",
            "--sampler guidance_scale: Value 'high' of type 'str' could not be converted to Float",
        ),
    ],
)
def test_a_bad_sampler_override_is_refused_with_its_key(override, message):
    with pytest.raises(SystemExit) as err:
        override_sampler(SamplerConfig(steps=[8]), [override])
    assert str(err.value) == message


def test_the_reference_clips_draw_the_runs_own_shapes():
    """The real-clip reference renders the world the run was trained on: its saved
    ``data.synthetic.radius``, not the tiny VAE's range (a run on other shapes would be judged against a
    reference it never saw)."""
    from types import SimpleNamespace

    from bench.tiny_long_video import reference_clip
    from helios.config import compose
    from helios.world.measures import PALETTE_NAMES, palette_labels

    def area(radius: str, caption: str) -> int:
        run = SimpleNamespace(size=(64, 64), train_config=compose([f"data.synthetic.radius={radius}"]))
        label, _ = palette_labels(reference_clip(run, caption, 3, 2))
        return int((label[0] == PALETTE_NAMES.index("fg:yellow")).sum())

    square = "a yellow square moving up on a gray background"
    assert area("[0.25,0.25]", square) == 32 * 32  # radius 16 of 64: a square 32 pixels wide
    assert area("[0.125,0.125]", square) == 16 * 16


def test_the_verdict_counts_what_the_history_keeps_once_the_first_section_holds():
    """``kept_when_first_section_held`` sets the first (text-only) section's drawing aside: of the samples
    whose first section holds the shape, the share that keep it in every later one too."""
    from bench.tiny_long_video import verdict

    def sample(*present: float) -> dict:
        rows = [{"present": p, "form": 1.0} for p in present]
        return {"sections": rows, "min_present": min(present), "moves_along": 1.0}

    held, lost_later, never_drawn = sample(1.0, 1.0, 0.96), sample(1.0, 0.5, 1.0), sample(0.2, 1.0, 1.0)
    v = verdict([held, lost_later, never_drawn])
    assert v["shape_kept_in_every_section"] == pytest.approx(1 / 3)
    assert v["first_section_held"] == pytest.approx(2 / 3)
    assert v["kept_when_first_section_held"] == 0.5
    assert math.isnan(verdict([never_drawn])["kept_when_first_section_held"])


def test_the_target_pools_each_sections_frames_over_the_samples():
    """Issue #35's target reads "over 16 samples, the shape in >= 95 % of the frames of every one of 10
    sections": section k's frames of all the samples pooled. One frame of 9 lost in one of 16 samples
    (99.3 % of that section's frames) meets it, where the stricter per-sample reading fails; a whole
    section lost in one of 16 (93.75 %) fails both; direction below 90 % of the samples fails it too."""
    from bench.tiny_long_video import verdict

    def sample(present: list[float], moves: float = 1.0) -> dict:
        rows = [{"present": p, "form": 1.0} for p in present]
        return {"sections": rows, "min_present": min(present), "moves_along": moves}

    whole = [1.0] * 10
    one_frame = [1.0, 1.0, 8 / 9, *[1.0] * 7]
    v = verdict([sample(whole)] * 15 + [sample(one_frame)])
    assert v["section_frames_present"][2] == pytest.approx(1 - 1 / 144)
    assert v["worst_section_frames"] == pytest.approx(1 - 1 / 144)
    assert v["target_met"] and not v["every_sample_kept"]
    lost = verdict([sample(whole)] * 15 + [sample([1.0, 1.0, 0.0, *[1.0] * 7])])
    assert lost["worst_section_frames"] == pytest.approx(15 / 16) and not lost["target_met"]
    astray = verdict([sample(whole)] * 14 + [sample(whole, moves=0.0)] * 2)
    assert astray["moves_along"] == pytest.approx(0.875) and not astray["target_met"]
    assert verdict([sample(whole)] * 16)["every_sample_kept"]


def test_the_reports_json_writes_a_ratio_of_nothing_as_null():
    """What the benches write is strict JSON: NaN (no sample to count) becomes null, nested or not, and
    finite numbers, strings and booleans are kept."""
    import json

    from helios.infra.metrics import strict_json

    report = {"verdict": {"kept": math.nan, "held": 0.5, "ok": True}, "rows": [[1.0, math.inf], "x", 3]}
    text = json.dumps(strict_json(report), allow_nan=False)
    assert json.loads(text) == {
        "verdict": {"kept": None, "held": 0.5, "ok": True},
        "rows": [[1.0, None], "x", 3],
    }
