"""The moving-shapes world's measures tell real clips from noise, a wrong colour, a frozen shape."""

from __future__ import annotations

import math

import pytest
import torch

from helios.world.measures import (
    PALETTE_NAMES,
    caption_metrics,
    caption_section_metrics,
    count_blobs,
    form_score,
    long_video_summary,
    mean_metrics,
    palette_labels,
    parse_caption,
    section_measures,
    torus_centre,
    torus_step,
    video_metrics,
)
from helios.world.shapes import BACKGROUNDS, COLORS, Scene, all_scenes, render_clip


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


def _long_clip(scene: Scene, sections: int = 10, seed: int = 0) -> torch.Tensor:
    return render_clip(9 * sections, 64, 64, torch.Generator().manual_seed(seed), scene)[0]


def test_a_real_long_clip_keeps_its_shape_colour_and_direction_in_every_section():
    for k, scene in enumerate(all_scenes()[::7]):  # every direction, colour, shape and background
        rows = section_measures(_long_clip(scene, seed=k), scene.caption, 9, 9)
        summary = long_video_summary(rows)
        assert len(rows) == 10 and summary["min_present"] == 1.0 and summary["min_colour"] == 1.0
        assert summary["sections_advancing"] == 1.0 and summary["moves_along"] == 1.0
        # the renderer's speed (1-3 px per frame) over 89 frame-to-frame moves, seams included
        assert 89 * 0.9 <= summary["advance"] <= 89 * 3 * 1.1
        assert all(0.0 <= r["position"] < 1.0 for r in rows) and math.isnan(rows[0]["seam_step"])
        assert all(r["seam_step"] > 0 for r in rows[1:])  # a shape the border clips moves its centre more


def test_a_lost_shape_a_wrong_colour_and_a_reversed_move_show_in_their_sections():
    scene = Scene("red", "circle", "right", "blue")
    video = _long_clip(scene)
    bg = (torch.tensor(BACKGROUNDS["blue"], dtype=torch.float32) / 127.5 - 1).view(3, 1, 1, 1)
    lost = video.clone()
    lost[:, 9 * 6 + 3 : 9 * 7] = bg  # section 6 loses the shape after 3 of its 9 frames
    rows = section_measures(lost, scene.caption, 9, 9)
    assert [r["present"] for r in rows] == [1.0] * 6 + [3 / 9] + [1.0] * 3
    assert math.isnan(rows[7]["seam_step"])  # nothing to step from
    assert long_video_summary(rows)["min_present"] == pytest.approx(3 / 9)
    green = Scene("green", "circle", "right", "blue")
    assert long_video_summary(section_measures(video, green.caption, 9, 9))["min_present"] == 0.0
    backwards = section_measures(video.flip(1), scene.caption, 9, 9)
    assert long_video_summary(backwards)["moves_along"] == 0.0
    assert all(r["advance"] < 0 for r in backwards)
    mirrored = Scene("red", "circle", "left", "blue")  # the same pixels read along the other direction
    assert long_video_summary(section_measures(video, mirrored.caption, 9, 9))["advance"] < 0


def test_the_form_score_tells_a_rendered_circle_from_a_square_wherever_it_is():
    """Every rendered frame's form score is on its shape's side, by a margin, in the middle of the frame or
    split across a border; read with the other shape's caption a clip's sections show form 0."""
    gen = torch.Generator().manual_seed(3)
    for scene in all_scenes()[::5]:
        for anywhere in (False, True):
            clip, _ = render_clip(4, 64, 64, gen, scene, anywhere=anywhere)
            label, _ = palette_labels(clip)
            for mask in label == PALETTE_NAMES.index(f"fg:{scene.colour}"):
                score = form_score(mask, torus_centre(mask))
                assert (-0.2 < score < -0.13) if scene.shape == "circle" else (0.14 < score < 0.18)
    circle = Scene("red", "circle", "right", "blue")
    video = _long_clip(circle, sections=3)
    assert [r["form"] for r in section_measures(video, circle.caption, 9, 9)] == [1.0] * 3
    square = Scene("red", "square", "right", "blue")
    rows = section_measures(video, square.caption, 9, 9)
    assert [r["form"] for r in rows] == [0.0] * 3 and long_video_summary(rows)["mean_form"] == 0.0


def test_a_section_without_the_shape_has_no_form_and_the_mean_leaves_it_out():
    scene = Scene("yellow", "square", "down", "gray")
    video = _long_clip(scene, sections=3)
    bg = (torch.tensor(BACKGROUNDS["gray"], dtype=torch.float32) / 127.5 - 1).view(3, 1, 1, 1)
    video[:, 9:18] = bg  # section 1 never shows the shape
    video[:, 18:23] = bg  # section 2 shows it in 4 of its 9 frames: its form counts those 4
    rows = section_measures(video, scene.caption, 9, 9)
    assert rows[0]["form"] == 1.0 and math.isnan(rows[1]["form"]) and rows[2]["form"] == 1.0
    assert rows[2]["present"] == pytest.approx(4 / 9)
    assert long_video_summary(rows)["mean_form"] == 1.0
    flat = caption_section_metrics(video, scene.caption, 9, 9)
    assert "section1_form" not in flat and flat["section2_form"] == 1.0 and flat["long_mean_form"] == 1.0


def test_the_centre_is_taken_on_the_torus():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:6, 0:2] = True
    mask[4:6, 14:16] = True  # one shape split by the right border: its centre is on the border
    x, y = torus_centre(mask)
    assert min(x, 16 - x) == pytest.approx(0.5) and y == pytest.approx(4.5)
    assert torus_step(15.0, 1.0, 16) == 2.0 and torus_step(1.0, 15.0, 16) == -2.0


def test_the_dashboard_gets_flat_section_keys_for_shapes_captions_only():
    scene = Scene("white", "square", "up", "black")
    flat = caption_section_metrics(_long_clip(scene, sections=3), scene.caption, 9, 9)
    assert flat["section2_present"] == 1.0 and flat["long_min_present"] == 1.0
    assert "section0_seam_step" not in flat and "section1_seam_step" in flat
    assert caption_section_metrics(_long_clip(scene, sections=3), "a cat on a sofa", 9, 9) == {}


def test_a_clip_starts_its_shape_in_the_middle_or_anywhere_on_the_torus():
    """The default start is in the middle 40 % of the frame (a single frame never shows the shape split by a
    border); ``anywhere`` (the tiny VAE's last training phase) spreads it over the whole torus, so a short
    clip shows border crossings as often as a long video does."""

    def starts(anywhere: bool) -> list[tuple[float, float]]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(200):
            clip, caption = render_clip(1, 64, 64, gen, anywhere=anywhere)
            label, _ = palette_labels(clip)
            out.append(torus_centre(label[0] == PALETTE_NAMES.index(f"fg:{parse_caption(caption).colour}")))
        return out

    middle, anywhere = starts(False), starts(True)
    assert all(19 <= x <= 45.5 and 19 <= y <= 45.5 for x, y in middle)
    near_border = [min(x, 64 - x) < 8 or min(y, 64 - y) < 8 for x, y in anywhere]
    assert 0.3 < sum(near_border) / len(near_border) < 0.6  # 1 - (48 / 64) ** 2 = 0.44 of the starts
