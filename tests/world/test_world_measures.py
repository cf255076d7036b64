"""The moving-shapes world's measures tell real clips from noise, a wrong colour, a frozen shape."""

from __future__ import annotations

import pytest
import torch

from helios.world.measures import caption_metrics, count_blobs, mean_metrics, parse_caption, video_metrics
from helios.world.shapes import BACKGROUNDS, COLORS, render_clip


def _clips(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [render_clip(17, 64, 64, g) for _ in range(n)]


def test_real_clips_match_their_captions():
    m = mean_metrics([video_metrics(v, c) for v, c in _clips(6)])
    assert m["palette_error"] < 1e-3 and m["shape_colour_match"] == 1.0 and m["objects"] == 1.0
    assert 0.75 < m["background_match"] < 0.99  # the shape covers a few % to a quarter of the frame
    assert 1.0 <= m["motion_along"] <= 3.0  # the renderer's speed, along the caption's direction


def test_noise_a_wrong_colour_and_a_frozen_shape_score_as_such():
    (video, caption), *_ = _clips(1, seed=1)
    noise = video_metrics(torch.rand_like(video) * 2 - 1, caption)
    assert noise["palette_error"] > 0.2 and noise["background_match"] < 0.2
    scene = parse_caption(caption)
    other = next(c for c in COLORS if c != scene.colour)
    wrong = video_metrics(video, caption.replace(f"a {scene.colour} ", f"a {other} ", 1))
    assert wrong["shape_colour_match"] == 0.0
    frozen = video_metrics(video[:, :1].expand_as(video), caption)
    assert frozen["motion_along"] == 0.0 and frozen["objects"] == 1.0


def test_blobs_wrap_around_the_borders_and_small_ones_are_ignored():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:8, 0:2] = True
    mask[5:8, 14:16] = True  # the same shape, split by the right border
    mask[12, 12] = True  # one stray pixel
    assert count_blobs(mask, min_area=4) == 1 and count_blobs(mask, min_area=1) == 2


def test_other_text_is_refused():
    with pytest.raises(ValueError, match="not a moving-shapes caption"):
        parse_caption("a cat on a sofa")


def test_validation_measures_only_moving_shapes_captions_and_leaves_out_undefined_ones():
    (video, caption), *_ = _clips(1, seed=2)
    assert caption_metrics(video, caption) == video_metrics(video, caption)
    assert caption_metrics(video, "a cat on a sofa") == {}  # a real run's prompt: nothing to measure
    rgb = torch.tensor(BACKGROUNDS[parse_caption(caption).background], dtype=torch.float32) / 127.5 - 1
    blank = rgb.view(3, 1, 1, 1).expand_as(video)  # background only: no motion seen, left out (not NaN)
    measured = caption_metrics(blank, caption)
    assert "motion_along" not in measured and measured["objects"] == 0.0
