"""The toy-scale experiment's distillation check, fast: the same DMD + GAN run from the tiny Helios-Mid with
the DMD gradient's sign flipped ends far from the distribution its real score (the tiny Helios-Base with CFG)
samples (and on the 8-clip world the right sign stayed near it: a strict xfail on today's world, #35); plus
the experiment command's rehearsal end to end.

Why not "closer than the undistilled generator": at this scale that margin is within the run-to-run spread
(BENCHMARKS.md: DMD + GAN alone was closer on 1 of 3 seeds; single runs of the same recipe with different
random streams range 1.0-2.3 against the undistilled 1.2), so a check on it passes or fails by chance. The
sign of the gradient is what a defect breaks, and a flipped one ends two orders of magnitude away."""

import json
import subprocess
import sys

import pytest

import helios.stages.distilled.post as distill_post
from helios.toy_experiment import ToyRecipe, distill_chain, distill_report, format_tables, summarize
from tests.helpers.runs import ROOT

WORLD = ("palette_error", "shape_colour_match", "objects")


def _dmd_check(root, name: str) -> dict:
    recipe = ToyRecipe(
        seeds=[0],
        stage1_steps=200,
        stage2_steps=200,
        post_steps=100,
        ode_pair_steps=6,
        prompts=4,
        sample_seeds=2,
        distill_sections=1,
        students={},  # no ODE init: DMD + GAN alone, straight from the tiny Helios-Mid
        dmd_only={name: []},
    )
    report = distill_report(distill_chain(root, recipe, 0), recipe)
    return {"student": report[name]["frechet_base"], "undistilled": report["undistilled"]["frechet_base"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")  # the tiny Base and Mid are trained once for both runs


@pytest.fixture(scope="module")
def dmd_runs(root) -> tuple[dict, dict]:
    right = _dmd_check(root, "dmd")
    correct = distill_post.dmd_gradient
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_post, "dmd_gradient", lambda *a: -correct(*a))
        flipped = _dmd_check(root, "flipped")
    return right, flipped


def test_a_flipped_dmd_gradient_runs_away(dmd_runs):
    right, flipped = dmd_runs
    assert right["undistilled"] == flipped["undistilled"]  # the same Mid, sampled the same way
    # measured on the 8-clip world (seed 0): the right sign ended at 1.0-2.3, the flipped one at ~200
    assert flipped["student"] > 20 * right["student"], (right, flipped)


@pytest.mark.xfail(strict=True, reason="#35 part 4: on the world of 2026-12-05 (torus, every scene, words)")
def test_dmd_stays_near_its_real_score(dmd_runs):
    """On the 8-clip world DMD + GAN from the tiny Mid stayed within 3x the undistilled generator's distance
    to the Base (1.0-2.3 vs 1.2); on the world of 2026-12-05 it ends at 6.0 vs 1.16 (with caption dropout
    and the empty prompt as the unconditional branch: 7.6 vs 0.65). The toy experiment's redo (#35) owns
    finding why; the sign check above still separates."""
    right, _ = dmd_runs
    assert right["student"] < 3 * right["undistilled"], right


def test_the_experiment_command_rehearses_end_to_end(tmp_path):
    out = tmp_path / "toy"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "toy_experiment.py"),
            "--quick",
            "--seeds",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["seed"] for s in report["seeds"]] == [3]
    summary = report["summary"]
    for name in ("undistilled", "ode_init", "student", "dmd+gan only"):
        assert summary[f"distill/{name}/frechet"]["values"] == [
            report["seeds"][0]["distill"][name]["frechet"]
        ]
    assert summary["distill/real/world/shape_colour_match"]["mean"] == 1.0  # real clips score as the world
    assert set(report["seeds"][0]["drift"]) == {"corrupt+anchor", "no corrupt", "no anchor"}
    assert "| student |" in (out / "table.md").read_text() and "| no anchor |" in run.stdout
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_number_is_summarised_over_the_seeds_with_its_spread():
    def seed(i: float) -> dict:
        row = {"paired_error": i, "frechet": 2 * i, "frechet_base": 3 * i, "world": dict.fromkeys(WORLD, i)}
        world_last = dict.fromkeys(WORLD, i)
        return {
            "distill": {"student": row, "real": {"world": dict.fromkeys(WORLD, 1.0)}},
            "drift": {"no corrupt": {"drift": [0.0, i, 2 * i], "world_last": world_last}},
        }

    summary = summarize([seed(1.0), seed(3.0)])
    assert summary["distill/student/frechet"]["mean"] == 4.0
    assert summary["distill/student/frechet"]["std"] == pytest.approx(2.0**1.5)  # sample std of 2 and 6
    assert summary["drift/no corrupt/section_3"]["values"] == [2.0, 6.0]
    assert summary["drift/no corrupt/mean"]["mean"] == pytest.approx(3.0)  # sections 2..3 of both seeds
    assert "distill/real/frechet" not in summary and summary["distill/real/world/objects"]["std"] == 0.0
    table = format_tables({"summary": summary, "seeds": [seed(1.0), seed(3.0)]})
    assert "| student | 2.000 ± 1.414 | 4.000 ± 2.828 |" in table
    assert table.index("section 2") < table.index("section 3")
