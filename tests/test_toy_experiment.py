"""The toy-scale experiment's distillation check, fast: DMD + GAN from the tiny Helios-Mid moves the few-step
generator toward the distribution its real score (the tiny Helios-Base with CFG) samples, and the same run
with the DMD gradient's sign flipped runs away from it; plus the experiment command's rehearsal end to end.

The generator's lr is 3e-4 here, not the tiny stage-3 config's 1e-3 (a 20-step CPU job): DMD + GAN first
comes close and then overshoots once lr x steps passes ~0.05 (Fréchet to the Base after 25 steps at 1e-3
0.36, after 100 6.0, against the undistilled 1.16; at 3e-4 0.44 after 100 and 11.6 after 300; at 1e-4 0.51
after 300), on the world of 2026-12-05 (seed 0; BENCHMARKS.md "toy-scale experiment" says why). Flipped,
100 steps at 3e-4: 7.0. A defect in the DMD gradient's sign or scale breaks both checks."""

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

import helios.stages.distilled.post as distill_post
from bench.toy_recipe import (
    UNCOND_SAMPLER,
    ToyRecipe,
    _cell,
    base_sampler,
    distill_chain,
    distill_report,
    format_tables,
    merge_reports,
    spread,
    summarize,
    teacher_sampler,
)
from helios.config.schema import REFERENCE_NEGATIVE_PROMPT
from helios.infra.metrics import strict_json
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
        dmd_only={name: ["optim.lr=3e-4"]},
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


def test_dmd_moves_the_generator_toward_its_real_score(dmd_runs):
    right, flipped = dmd_runs
    assert right["undistilled"] == flipped["undistilled"]  # the same Mid, sampled the same way
    # 2026-12-05, seed 0: right 0.44, flipped 7.0, undistilled 1.16 (Fréchet to the Base's samples)
    assert right["student"] < right["undistilled"], right


def test_a_flipped_dmd_gradient_runs_away(dmd_runs):
    right, flipped = dmd_runs
    assert flipped["student"] > 4 * flipped["undistilled"] and flipped["student"] > 8 * right["student"], (
        right,
        flipped,
    )


def test_the_experiment_command_rehearses_end_to_end(tmp_path):
    out = tmp_path / "toy"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "toy_experiment.py"),
            "--quick",
            "--seeds",
            "3",
            "--uncond=empty",  # the world's own is the reference's negative prompt
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["seed"] for s in report["seeds"]] == [3] and report["recipe"]["uncond"] == "empty"
    assert "uncond: empty" in (out / "seed3" / "stage3_student" / "config.yaml").read_text()
    summary = report["summary"]
    for name in ("undistilled", "ode_init", "student", "dmd+gan only"):
        assert summary[f"distill/{name}/frechet"]["values"] == [
            report["seeds"][0]["distill"][name]["frechet"]
        ]
    assert summary["distill/real/world/shape_colour_match"]["mean"] == 1.0  # real clips score as the world
    assert set(report["seeds"][0]["drift"]) == {"corrupt+anchor", "no corrupt", "no anchor"}
    assert "| student |" in (out / "table.md").read_text() and "| no anchor |" in run.stdout
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_world_experiment_rehearses_with_one_unconditional_prompt(tmp_path):
    """``--world default``: the tiny default's DiT and world, zero embeddings (what caption dropout trains)
    as the teacher's, the Base's and the real score's unconditional input, and every generator's long videos
    judged by the object measures (real clips through the VAE keep the shape)."""
    out = tmp_path / "toy"
    command = [sys.executable, str(ROOT / "bench" / "toy_experiment.py"), "--quick", "--world=default"]
    run = subprocess.run(
        [*command, "--seeds=0", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    long = report["seeds"][0]["long"]
    generators = {"teacher", "base", "base, no corrupt", "base, no anchor", "undistilled", "ode_init"}
    assert set(long) == {*generators, "student", "dmd+gan only", "real"}
    assert long["real"]["present_frames"] == 1.0 and long["real"]["samples"] == 2
    assert long["real"]["kept_when_first_section_held"] == 1.0
    assert report["seeds"][0]["drift"] == {} and "| dmd+gan only |" in run.stdout
    assert "| base, no anchor |" in run.stdout
    student = (out / "seed0" / "stage3_student" / "config.yaml").read_text()
    assert "uncond: zeros" in student and "lr: 0.0003" in student
    assert report["recipe"]["uncond"] == "zeros"
    seed0 = out / "seed0"
    base = (seed0 / "stage1" / "config.yaml").read_text()
    assert "caption_dropout: 0.2" in base and "attention_head_dim: 32" in base
    history = {
        name: OmegaConf.load(seed0 / f"stage1_base__no_{name}" / "config.yaml").history
        for name in ("corrupt", "anchor")
    }  # each Base without one mechanism, the other kept, as the Base's own config
    assert (history["corrupt"].corrupt.enabled, history["corrupt"].anchor) == (False, True)
    assert (history["anchor"].corrupt.enabled, history["anchor"].anchor) == (True, False)
    assert OmegaConf.load(seed0 / "stage1" / "config.yaml").history.anchor


def test_a_recipe_it_cannot_run_or_judge_is_refused_before_anything_trains():
    with pytest.raises(ValueError, match=r"uncond: 'none' is not one of \['empty', 'negative', 'zeros'\]"):
        ToyRecipe(uncond="none")
    recipes = {u: ToyRecipe(uncond=u) for u in UNCOND_SAMPLER}
    samplers = {u: (teacher_sampler(r), base_sampler(r)) for u, r in recipes.items()}
    assert {u: {s.negative_prompt for s in pair} for u, pair in samplers.items()} == {
        "negative": {REFERENCE_NEGATIVE_PROMPT},
        "empty": {""},
        "zeros": {None},
    }
    assert ToyRecipe.default_world([0]).uncond == "zeros" and ToyRecipe().uncond == "negative"
    with pytest.raises(ValueError, match="history_ablations are judged by long videos"):
        ToyRecipe(history_ablations={"no anchor": ["history.anchor=false"]})


def _fake_seed(i: float, seed: int = 0) -> dict:
    """One seed's entry of a report, every number a multiple of ``i``."""
    row = {"paired_error": i, "frechet": 2 * i, "frechet_base": 3 * i, "world": dict.fromkeys(WORLD, i)}
    world_last = dict.fromkeys(WORLD, i)
    long = {
        "shape_kept_in_every_section": i / 4,
        "kept_when_first_section_held": i / 2,
        "present_frames": i / 3,
        "worst_section_frames": i / 5,
        "form_match": 0.5,
        "moves_along": 1,
    }
    return {
        "seed": seed,
        "distill": {"student": row, "real": {"world": dict.fromkeys(WORLD, 1.0)}},
        "drift": {"no corrupt": {"drift": [0.0, i, 2 * i], "world_last": world_last}},
        "long": {"student": {**long, "samples": 16, "target_met": False}},
    }


def test_every_number_is_summarised_over_the_seeds_with_its_spread():
    summary = summarize([_fake_seed(1.0), _fake_seed(3.0)])
    assert summary["long/student/shape_kept_in_every_section"]["values"] == [0.25, 0.75]
    assert summary["long/student/present_frames"]["mean"] == pytest.approx(2 / 3)
    assert summary["long/student/form_match"]["std"] == 0.0 and "long/student/samples" not in summary
    table = format_tables({"summary": summary, "seeds": [_fake_seed(1.0)], "recipe": {"long_sections": 10}})
    assert "Long videos (1 seeds; 10 sections" in table
    row = "| student | 0.500 ± 0.354 | 1.000 ± 0.707 | 0.667 ± 0.471 | 0.400 ± 0.283 | 0.500 ± 0.000 | 1.000 "
    assert row in table
    assert summary["distill/student/frechet"]["mean"] == 4.0
    assert summary["distill/student/frechet"]["std"] == pytest.approx(2.0**1.5)  # sample std of 2 and 6
    assert summary["drift/no corrupt/section_3"]["values"] == [2.0, 6.0]
    assert summary["drift/no corrupt/mean"]["mean"] == pytest.approx(3.0)  # sections 2..3 of both seeds
    assert "distill/real/frechet" not in summary and summary["distill/real/world/objects"]["std"] == 0.0
    table = format_tables(
        {"summary": summary, "seeds": [_fake_seed(1.0), _fake_seed(3.0)], "recipe": {"long_sections": 10}}
    )
    assert "| student | 2.000 ± 1.414 | 4.000 ± 2.828 |" in table
    assert table.index("section 2") < table.index("section 3")


def test_a_ratio_a_seed_cannot_count_is_left_out_of_the_spread_and_named():
    """``kept_when_first_section_held`` is NaN for a seed where no sample's first section holds: the
    summary counts the other seeds and says how many; with none, the cell says so."""
    summary = {
        "long/a/kept": spread([0.5, math.nan, 1.0]),
        "long/b/kept": spread([math.nan]),
        "long/c/kept": spread([0.25, 0.75]),
    }
    assert summary["long/a/kept"]["mean"] == 0.75 and summary["long/a/kept"]["values"] == [0.5, None, 1.0]
    assert json.loads(json.dumps(summary, allow_nan=False))["long/b/kept"]["mean"] is None
    assert _cell(summary, "long/a/kept") == "0.750 ± 0.354 (2 of 3 seeds)"
    assert _cell(summary, "long/b/kept") == "none of the seeds"
    assert _cell(summary, "long/c/kept") == "0.500 ± 0.354"


def _report(seeds: dict[int, float], **recipe) -> dict:
    """A report as ``run_experiment`` writes it and JSON reads it back (NaN as null)."""
    per_seed = [_fake_seed(i, seed) for seed, i in seeds.items()]
    for entry in per_seed:
        if entry["seed"] == 4:  # no sample's first section held the shape: a ratio of nothing
            entry["long"]["student"]["kept_when_first_section_held"] = math.nan
    report = {
        "recipe": {**asdict(ToyRecipe(seeds=list(seeds))), **recipe, "long_sections": 10},
        "seeds": per_seed,
        "summary": summarize(per_seed),
        "seconds": 100.0 * len(seeds),
    }
    return json.loads(json.dumps(strict_json(report), allow_nan=False))


def test_seeds_run_apart_merge_into_the_report_of_one_run():
    """Seeds 3 and 4 run as their own command after 0-2: the merged report is the one a single run of all
    five writes (the same numbers, spread and table), NaN seeds included."""
    merged = merge_reports([_report({3: 8.0, 4: 16.0}), _report({0: 1.0, 1: 2.0, 2: 4.0})])
    whole = _report({0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0, 4: 16.0})
    assert merged["recipe"] == whole["recipe"] and [s["seed"] for s in merged["seeds"]] == [0, 1, 2, 3, 4]
    assert merged["seeds"] == whole["seeds"] and merged["summary"] == whole["summary"]
    assert merged["summary"]["distill/student/frechet"]["values"] == [2.0, 4.0, 8.0, 16.0, 32.0]
    kept = merged["summary"]["long/student/kept_when_first_section_held"]
    assert kept["values"] == [0.5, 1.0, 2.0, 4.0, None] and kept["seeds"] == 4 and kept["mean"] == 1.875
    assert merged["seconds"] == 500.0 and format_tables(merged) == format_tables(whole)


def test_reports_of_other_recipes_or_the_same_seed_are_not_merged():
    with pytest.raises(
        ValueError, match="report 1 ran another recipe than report 0: post_steps, uncond differ"
    ):
        merge_reports([_report({0: 1.0}), _report({1: 2.0}, uncond="zeros", post_steps=5)])
    with pytest.raises(ValueError, match=r"a seed comes twice: \[0, 1, 1\]"):
        merge_reports([_report({0: 1.0, 1: 2.0}), _report({1: 2.0})])
    with pytest.raises(ValueError, match="report 1 is not a toy experiment's report: no recipe, seconds"):
        merge_reports([_report({0: 1.0}), {"seeds": []}])


def test_the_merge_command_writes_a_new_folder_and_never_over_a_report(tmp_path):
    runs = []
    for name, seeds in (("a", {0: 1.0, 1: 2.0}), ("b", {2: 4.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(_report(seeds)))
        runs.append(str(tmp_path / name))
    runs[1] += "/report.json"  # a run's folder or its report itself (one kept in bench/results/)
    (tmp_path / "a" / "figure.png").write_bytes(b"a's figure")
    command = [sys.executable, str(ROOT / "bench" / "toy_experiment.py"), "--merge", *runs]
    run = subprocess.run([*command, f"--out={tmp_path / 'all'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert [s["seed"] for s in report["seeds"]] == [0, 1, 2] and report["merged_from"] == runs
    assert (tmp_path / "all" / "table.md").read_text() == format_tables(report) + "\n"
    assert "Distillation (3 seeds" in run.stdout and "| student | 2.333 ± 1.528 |" in run.stdout
    assert (tmp_path / "all" / "figure.png").read_bytes() == b"a's figure"
    before = (tmp_path / "a" / "report.json").read_text()
    again = subprocess.run([*command, f"--out={runs[0]}"], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "holds a report already" in again.stderr
    assert (tmp_path / "a" / "report.json").read_text() == before
    out = f"--out={tmp_path / 'x'}"
    lost = subprocess.run([*command, str(tmp_path / "c"), out], capture_output=True, text=True)
    assert lost.returncode != 0 and f"no report.json in {tmp_path / 'c'}" in lost.stderr
    (tmp_path / "cut.json").write_text('{"recipe": {')  # a report cut short by a full disk
    cut = subprocess.run([*command, str(tmp_path / "cut.json"), out], capture_output=True, text=True)
    assert cut.returncode != 0 and f"--merge: {tmp_path / 'cut.json'} is not JSON" in cut.stderr
    assert not (tmp_path / "x").exists()
