"""Toy-scale proof: the whole recipe (stage 1 -> stage 2 -> ODE pairs -> stage 3) trained on the tiny model
and the moving-shapes world, then measured: the distilled student's few-step samples against the teacher's
many-step samples and the undistilled generator's few-step samples, and stage 1's long-video drift with and
without Frame-Aware Corrupt and the first-frame anchor, each over several training seeds.

    python bench/toy_experiment.py [--out DIR] [--seeds 0 1 2] [--quick] [--world narrow|default]
        [--uncond negative|empty|zeros] [--overrides key=value ...]
    python bench/toy_experiment.py --merge DIR|REPORT.json [...] --out DIR
    helios bench toy [same arguments]

``--world default`` asks the distillation question on the tiny default's DiT and world (every scene, caption
dropout; zero embeddings as every CFG's unconditional input, as the default validates: ``--uncond empty``
for the empty prompt's encoding, what most results of 2026-12-06/07 used) and judges every generator's
10-section videos by the shapes world's object measures, beside two more Bases trained without Frame-Aware
Corrupt and without the first-frame anchor (30-33 minutes a fresh seed on 2 cores); the default
``narrow`` is the 2 x 24 DiT of BENCHMARKS.md's first table.

Writes DIR/report.json (every number, per seed), DIR/table.md (mean ± std over the seeds) and DIR/figure.png
(frames of a real clip, the teacher and each few-step generator). About 20 minutes on 2 CPU cores with the
defaults; ``--quick`` is a one-minute rehearsal with a few steps of each phase. ``--merge`` joins the reports
of the same recipe run for other seeds (a command, job or machine each) into one, the spread over all their
seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
if (CHECKOUT / "helios").is_dir():  # run from a checkout without installing
    sys.path.insert(0, str(CHECKOUT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy_experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase (a rehearsal)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--world",
        choices=("narrow", "default"),
        default="narrow",
        help="narrow: the 2 x 24 DiT of BENCHMARKS.md's table; default: the tiny default's DiT and world, "
        "one unconditional prompt, long videos judged by the object measures (ToyRecipe.default_world)",
    )
    parser.add_argument(
        "--uncond",
        choices=("negative", "empty", "zeros"),
        help="CFG's unconditional input for the teacher, the Base's samples and the real score: the "
        "reference's negative prompt, the empty prompt's encoding or zero embeddings (default: the world's: "
        "narrow negative, default zeros)",
    )
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="added to every training run, e.g. data.synthetic.fps=16",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN",
        help="join these runs' report.json (a run's folder or the JSON file itself: the same recipe, other "
        "seeds) into --out; trains nothing",
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return

    import torch

    from bench.toy_recipe import ToyRecipe, format_tables, run_experiment

    torch.set_num_threads(args.threads)
    recipe = ToyRecipe.default_world(args.seeds) if args.world == "default" else ToyRecipe(seeds=args.seeds)
    recipe.overrides = [*recipe.overrides, *args.overrides]
    if args.uncond is not None:
        recipe = dataclasses.replace(recipe, uncond=args.uncond)
    if args.quick:
        recipe = dataclasses.replace(
            recipe,
            num_videos=8,  # the ODE pairs are made for every clip: 32 took 61 of 146 s
            stage1=[*recipe.stage1, "trainer.batch_size=4"],  # (the default world's 32 > 8 clips)
            stage1_steps=10,
            stage2_steps=10,
            ode_steps=4,
            post_steps=4,
            ode_pair_steps=3,
            prompts=2,
            sample_seeds=1,
            drift_sections=3,
            long_sections=min(recipe.long_sections, 2),
            long_captions=2,
            long_seeds=[0],
        )
    report = run_experiment(Path(args.out), recipe)
    print(format_tables(report))
    print(f"\n{report['seconds']:.0f} s; {args.out}/report.json, table.md, figure.png")


def merge(runs: list[str], out: Path) -> None:
    """``--merge``: the runs' reports as one in ``out`` (which must not hold a report yet)."""
    import json
    import shutil

    from bench.toy_recipe import format_tables, merge_reports, write_report

    reports = [Path(run) if Path(run).is_file() else Path(run) / "report.json" for run in runs]
    missing = [run for run, report in zip(runs, reports, strict=True) if not report.is_file()]
    if missing:
        sys.exit(f"--merge: no report.json in {', '.join(missing)}")
    if (out / "report.json").exists():
        sys.exit(f"--out: {out} holds a report already; merge into a new folder")
    loaded = []
    for path in reports:
        try:
            loaded.append(json.loads(path.read_text()))
        except ValueError as error:
            sys.exit(f"--merge: {path} is not JSON: {error}")
    try:
        report = merge_reports(loaded)
    except ValueError as error:
        sys.exit(f"--merge: {error}")
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, {**report, "merged_from": runs})
    figures = [path.parent / "figure.png" for path in reports if (path.parent / "figure.png").is_file()]
    if figures:  # the first run's: its first seed's samples, as the experiment draws it
        shutil.copyfile(figures[0], out / "figure.png")
    print(format_tables(report))
    print(f"\n{len(report['seeds'])} seeds from {len(runs)} runs; {out}/report.json, table.md")


if __name__ == "__main__":
    main()
