"""The tiny default job, whole (``python train_helios.py``, nothing overridden), and what its model does over
10 sections (``bench/tiny_long_video.py``: 8 captions that between them use every colour, shape, direction
and background, x 2 seeds): the caption's shape stays and moves the caption's way. The README's numbers are
this check's, issue #35's target among them (over the 16 samples, the shape in >= 95 % of the frames of
every section, each section's frames pooled; moving the caption's way in >= 90 % of the samples). The
stricter per-sample reading (no sample loses the shape for a frame in any section) is not reached yet and is
held as a strict xfail, so reaching it shows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helios.infra.metrics import read_metrics
from tests.helpers.runs import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny-default")
    proc = subprocess.run(
        [sys.executable, "train_helios.py", f"hydra.run.dir={run}", "trainer.progress=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def long_video(default_run):
    out = default_run / "long_video.json"
    proc = subprocess.run(
        [sys.executable, "bench/tiny_long_video.py", f"--checkpoint={default_run}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_default_validation_is_a_ten_section_video_measured_section_by_section(default_run):
    last = read_metrics(default_run)[-1]
    assert last["step"] == 1800
    present = [last[f"val/{prompt}/world_section{k}_present"] for prompt in (0, 1) for k in range(10)]
    assert all(0.0 <= p <= 1.0 for p in present) and "val/1/world_long_moves_along" in last
    assert sum(present) / 20 >= 0.8, present  # 2026-12-07: 1.0 (2026-12-05, smaller shapes: 0.69)


def test_the_default_keeps_the_captions_shape_and_direction_over_ten_sections(long_video):
    v, real = long_video["verdict"], long_video["reference_verdict"]
    assert v["samples"] == 16 and long_video["sections"] == 10
    assert v["moves_along"] >= 0.9  # the issue's direction target
    assert v["present_frames"] >= 0.9  # of all 1,440 frames, the caption's shape (2026-12-07: 0.997)
    assert real["present_frames"] >= 0.95 and real["moves_along"] == 1.0  # the measures can see it
    assert real["target_met"]  # real clips through the tiny VAE meet the target: it is within reach
    # the form measure tells circles from squares through the VAE (2026-12-07: 0.998); the model's own is
    # at chance (0.47: a round blob for either caption), reported, not judged
    assert real["form_match"] >= 0.95 and 0.0 <= v["form_match"] <= 1.0


def test_the_issue_target_the_shape_in_every_sections_frames_and_the_captions_way(long_video):
    v = long_video["verdict"]
    # 2026-12-07: the worst section 0.986 of its 144 frames, every sample moving the caption's way
    assert v["worst_section_frames"] >= 0.95 and v["moves_along"] >= 0.9 and v["target_met"]


@pytest.mark.xfail(strict=True, reason="stricter than #35's target: every section of every sample (13 of 16)")
def test_no_sample_loses_the_shape_in_any_section(long_video):
    assert long_video["verdict"]["every_sample_kept"]
