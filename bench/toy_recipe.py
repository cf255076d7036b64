"""The toy-scale experiment: the whole recipe (stage 1 -> stage 2 -> ODE pairs -> stage 3) on the tiny
model and the moving-shapes world, measured end to end (issue: toy-scale proof).

Two questions, each asked over several training seeds:

- **Distillation** (§4): are the stage-3 student's few-step samples closer to the teacher's many-step
  samples than the undistilled generator's (the teacher's weights with the same few-step sampler)?
  Same prompts, same sampling seeds. Measured in the latent space the models work in: the paired
  relative error to the teacher's sample of the same noise, and a diagonal Fréchet distance between the
  sets' per-sample channel statistics (mean and spread of each latent channel).
- **Drift** (§3.2.3, §3.5, Table 5): a long stage-1 video (>= 10 sections) with and without Frame-Aware
  Corrupt and the first-frame anchor: how far each section's channel statistics move from the first
  section's.

With :meth:`ToyRecipe.default_world` the distillation question is asked on the tiny default's DiT and world
and every generator's long videos are judged by the object measures (shape present, form, direction).

The shapes-world measures (:mod:`helios.world.measures`) of the decoded videos are reported beside
them; they describe the pictures only with a VAE that reconstructs the world, not the tiny default's random
one (which decodes everything to coloured noise).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from helios.bench.tiny_recipe import train_run
from helios.commands.teacher_ode_pairs import run as make_ode_pairs
from helios.config import compose
from helios.config.schema import OdePairsConfig, SamplerConfig
from helios.data.synthetic import synthetic_shards
from helios.infra.metrics import strict_json
from helios.loading import LoadedModel, load_for_inference
from helios.sampling.decode import section_frames
from helios.world.measures import mean_metrics, video_metrics
from helios.world.shapes import render_clip

# recipe.uncond -> the CFG samplers' SamplerConfig keywords (stage 3 gets distill.uncond=<the same name>)
UNCOND_SAMPLER: dict[str, dict[str, str | None]] = {
    "negative": {},
    "empty": {"negative_prompt": ""},
    "zeros": {"negative_prompt": None},
}


@dataclass
class ToyRecipe:
    """Step counts and sample counts of the experiment; the defaults fit 20 minutes on 2 CPU cores."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_videos: int = 32  # the synthetic training set (the tiny default has 8)
    stage1_steps: int = 600
    stage2_steps: int = 600
    teacher_cfg: float = 3.0  # the teacher's guidance: the ODE pairs', the reference's, the real score's
    teacher_cfg_zero_star: bool = True  # as the ODE pairs command's default
    ode_pair_steps: int = 8  # the teacher's steps per pyramid stage, for the ODE pairs and the reference
    ode_steps: int = 150
    post_steps: int = 150
    student_steps: list[int] = field(default_factory=lambda: [2, 2, 2])
    amplify_first: bool = True  # the distilled sampler's longer schedule for the first section
    prompts: int = 8  # evaluation prompts: the first training captions (the text encoder knows no others)
    sample_seeds: int = 2
    distill_sections: int = 2
    drift_sections: int = 10
    drift_steps: int = 8  # stage 1's UniPC steps per section
    drift_variants: dict[str, list[str]] = field(
        default_factory=lambda: {
            "corrupt+anchor": [],
            "no corrupt": ["history.corrupt.enabled=false"],
            "no anchor": ["history.anchor=false"],
        }
    )
    # stage-3 DMD + GAN runs (the tiny stage-3 config plus these overrides): after the ODE init ...
    students: dict[str, list[str]] = field(
        default_factory=lambda: {"student": [], "student lr=1e-4": ["optim.lr=1e-4"]}
    )
    # ... and straight from Helios-Mid (no ODE init): what DMD + GAN alone do
    dmd_only: dict[str, list[str]] = field(default_factory=lambda: {"dmd+gan only": []})
    # The experiment's own tiny DiT and stage-1 law (the tiny default of 2026-11-22, on which BENCHMARKS.md's
    # table was measured): 2 heads x 24, a LoRA on the random base, logit-normal unshifted t, constant lr. On
    # the 128-wide default (full fine-tuning, uniform shifted t) the Mid's few-step samples are already
    # close to the Base's (Frechet 0.48 vs 3.5), leaving distillation no gap to show at this scale.
    model: list[str] = field(
        default_factory=lambda: [
            "model.transformer.num_attention_heads=2",
            "model.transformer.attention_head_dim=24",
            "model.transformer.ffn_dim=96",
            "model.transformer.rope_dim=[8,8,8]",
        ]
    )
    # (and the batch, lr and clips of that day's stage-1 default: the default of 2026-12-05 trains 32 clips of
    # 11 sections a step with caption dropout, for the 10-section default job)
    stage1: list[str] = field(
        default_factory=lambda: [
            "model.lora.enabled=true",
            "flow.timestep_sampling=logit_normal",
            "flow.shift.enabled=false",
            "optim.schedule=constant",
            "optim.lr=2e-3",
            "trainer.batch_size=4",
            "data.synthetic.sections=null",
            "data.caption_dropout=0.0",
        ]
    )
    stage2: list[str] = field(default_factory=list)  # added to the stage-2 run
    overrides: list[str] = field(default_factory=list)  # added to every training run (e.g. model.vae...)
    # CFG's unconditional branch for the teacher (ODE pairs, reference samples), the Base's samples and the
    # real score: "negative" (the reference's negative prompt; the real score's distill.uncond default),
    # "empty" (one unconditional prompt everywhere: the empty prompt's encoding, issue #35) or "zeros" (zero
    # embeddings everywhere: what caption dropout trains, the tiny default validation's; BENCHMARKS.md)
    uncond: str = "negative"
    # long videos of every generator, judged by the shapes world's object measures (bench/tiny_long_video.py):
    # sections (0: none), captions spread over the world, sampling seeds
    long_sections: int = 0
    long_captions: int = 8
    long_seeds: list[int] = field(default_factory=lambda: [0, 1])
    # stage-1 Bases each trained without one history mechanism (Frame-Aware Corrupt §3.2.3, the first-frame
    # anchor §3.5), their long videos judged beside the Base's by the object measures (long_sections > 0)
    history_ablations: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.uncond not in UNCOND_SAMPLER:  # before an hour of training reaches stage 3's check
            raise ValueError(f"uncond: {self.uncond!r} is not one of {sorted(UNCOND_SAMPLER)}")
        if self.history_ablations and not self.long_sections:  # they would train and never be judged
            raise ValueError("history_ablations are judged by long videos: they need long_sections > 0")

    @classmethod
    def default_world(cls, seeds: list[int]) -> ToyRecipe:
        """The distillation question on the tiny default's world and DiT (every scene, 11-section clips,
        caption dropout, the 128-wide DiT fully fine-tuned for the default job's 1,800 steps): one
        unconditional input (zero embeddings, what caption dropout trains and the tiny default validates
        against; until 2026-12-07 the empty prompt, ``uncond="empty"``) for the teacher, the Base and the real
        score, DMD + GAN at the generator lr x steps that lands near its real score (3e-4 x 100,
        BENCHMARKS.md), and every generator's 10-section videos judged by the object measures, beside those of
        two more Bases, one trained without Frame-Aware Corrupt and one without the first-frame anchor."""
        world = ["data.synthetic.sections=11"]
        return cls(
            seeds=seeds,
            num_videos=96,
            stage1_steps=1800,
            stage2_steps=600,
            post_steps=100,
            model=[],
            stage1=[],
            stage2=["data.caption_dropout=0.1"],  # the Base's unconditional branch stays trained
            overrides=world,
            uncond="zeros",
            students={"student": ["optim.lr=3e-4"]},
            dmd_only={"dmd+gan only": ["optim.lr=3e-4"]},
            drift_variants={},
            long_sections=10,
            history_ablations={
                "base, no corrupt": ["history.corrupt.enabled=false"],
                "base, no anchor": ["history.anchor=false"],
            },
        )


# ---------------------------------------------------------------------------------------------- training
def train(run_dir: Path, overrides: list[str], steps: int, recipe: ToyRecipe, seed: int) -> Path:
    """One training run of the recipe (reused when ``run_dir`` already holds its final checkpoint)."""
    common = [f"seed={seed}", f"data.synthetic.num_videos={recipe.num_videos}"]
    return train_run(
        run_dir,
        [*common, f"trainer.log_every={max(1, steps // 50)}", *recipe.model, *recipe.overrides, *overrides],
        steps,
    )


def train_base(run_dir: Path, overrides: list[str], recipe: ToyRecipe, seed: int) -> Path:
    """The recipe's stage 1 (Helios-Base) with ``overrides`` on top (none: the chain's Base; else an
    ablation of it)."""
    return train(run_dir, ["stage=1", *recipe.stage1, *overrides], recipe.stage1_steps, recipe, seed)


def negative_prompt(recipe: ToyRecipe) -> dict[str, str | None]:
    """The CFG samplers' unconditional prompt (``recipe.uncond``), as SamplerConfig keywords."""
    return UNCOND_SAMPLER[recipe.uncond]


def teacher_sampler(recipe: ToyRecipe) -> SamplerConfig:
    return SamplerConfig(
        kind="pyramid",
        steps=[recipe.ode_pair_steps] * 3,
        guidance_scale=recipe.teacher_cfg,
        cfg_zero_star=recipe.teacher_cfg_zero_star,
        **negative_prompt(recipe),
    )


def base_sampler(recipe: ToyRecipe) -> SamplerConfig:
    """The Base's many-step samples: the distribution DMD's real score describes."""
    return SamplerConfig(
        kind="unipc",
        steps=[3 * recipe.ode_pair_steps],
        guidance_scale=recipe.teacher_cfg,
        **negative_prompt(recipe),
    )


def student_sampler(recipe: ToyRecipe) -> SamplerConfig:
    return SamplerConfig(
        kind="dmd",
        steps=list(recipe.student_steps),
        guidance_scale=1.0,
        amplify_first=recipe.amplify_first,
        shift_type="linear",
    )


def distill_chain(root: Path, recipe: ToyRecipe, seed: int) -> dict[str, Path]:
    """The paper's recipe with the reference's roles: stage 1 (Helios-Base: the real and fake scores'
    base) -> stage 2 (Helios-Mid: the ODE pairs' teacher and the generator's start) -> ODE pairs ->
    stage 3 ODE init -> stage 3 DMD + GAN (each of ``recipe.students``); ``recipe.dmd_only`` start the
    DMD + GAN phase from Helios-Mid; ``recipe.history_ablations`` are more stage-1 runs beside the chain."""
    runs = {"base": train_base(root / "stage1", [], recipe, seed)}
    runs["mid"] = train(
        root / "stage2",
        ["stage=2", f"init_from={runs['base']}", *recipe.stage2],
        recipe.stage2_steps,
        recipe,
        seed,
    )
    stage3 = [
        "stage=3",
        f"distill.teacher={runs['base']}",
        f"distill.uncond={recipe.uncond}",
        f"distill.real_cfg={recipe.teacher_cfg}",
        f"distill.steps=[{','.join(map(str, recipe.student_steps))}]",
        "distill.fake_lr=1e-3",  # the critic's lr BENCHMARKS.md's table was measured with
    ]
    from_mid = [f"distill.generator_init={runs['mid']}"]
    if recipe.students:
        pairs = ode_pairs(root / "ode_pairs", runs["mid"], recipe, seed)
        ode = ["stage3=tiny_ode", f"distill.ode_pairs={pairs}", *stage3, *from_mid]
        runs["ode_init"] = train(root / "stage3_ode", ode, recipe.ode_steps, recipe, seed)
    variants = [(name, [f"init_from={runs.get('ode_init')}", *o]) for name, o in recipe.students.items()]
    variants += [(name, [*from_mid, *o]) for name, o in recipe.dmd_only.items()]
    for name, overrides in variants:
        stage3_run = [*stage3, *overrides]
        runs[name] = train(root / f"stage3_{slug(name)}", stage3_run, recipe.post_steps, recipe, seed)
    for name, overrides in recipe.history_ablations.items():
        runs[name] = train_base(root / f"stage1_{slug(name)}", overrides, recipe, seed)
    return runs


def slug(name: str) -> str:
    """A variant's name as a run folder's name."""
    return "".join(c if c.isalnum() else "_" for c in name)


def ode_pairs(out: Path, teacher: Path, recipe: ToyRecipe, seed: int) -> Path:
    """The teacher's ODE pairs on the recipe's synthetic set (Staged ODE Init, §4.1)."""

    if not (out / "report.json").exists():
        common = [f"seed={seed}", f"data.synthetic.num_videos={recipe.num_videos}"]
        cfg = compose([*common, *recipe.model, *recipe.overrides])
        make_ode_pairs(
            OdePairsConfig(
                teacher=str(teacher),
                shards=str(synthetic_shards(cfg, True)),
                output=str(out),
                sampler=teacher_sampler(recipe),
                max_sequence_length=cfg.model.text_encoder.max_sequence_length,
                seed=seed,
                device="cpu",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Samples:
    latents: torch.Tensor  # [N, C, T, h, w] in the model's latent space
    frames: torch.Tensor  # [N, 3, F, H, W] decoded, in [-1, 1]
    captions: list[str]


def eval_prompts(n: int, synthetic_seed: int = 1234) -> list[str]:
    """The first ``n`` captions of the synthetic training set (drawn as ``make_synthetic_videos`` does)."""
    gen = torch.Generator().manual_seed(synthetic_seed)
    return [render_clip(1, 16, 16, gen)[1] for _ in range(n)]


def real_clips(n: int, num_frames: int, size: int, synthetic_seed: int = 1234) -> torch.Tensor:
    """The first ``n`` training clips, ``num_frames`` long: [n, 3, T, H, W] in [-1, 1]."""
    gen = torch.Generator().manual_seed(synthetic_seed)
    return torch.stack([render_clip(num_frames, size, size, gen)[0] for _ in range(n)])


def sample(
    model: LoadedModel, sampler: SamplerConfig, prompts: list[str], seeds: int, sections: int
) -> Samples:
    """One video per (prompt, sampling seed), batch 1 each (the generator seed fixes the noise)."""
    first, later = section_frames(model.layout.window, model.latent_format)
    num_frames = first + (sections - 1) * later
    latents, frames, captions = [], [], []
    for prompt in prompts:
        for s in range(seeds):
            generator = torch.Generator().manual_seed(1000 + s)
            result = model.generate(sampler, [(0, prompt)], num_frames, generator)
            latents.append(result.latents.float())
            frames.append(result.frames.float())
            captions.append(prompt)
    return Samples(torch.cat(latents), torch.cat(frames), captions)


# ---------------------------------------------------------------------------------------------- measures
def channel_features(latents: torch.Tensor) -> torch.Tensor:
    """Per sample: each latent channel's mean and standard deviation over time and space. [N, 2C]."""
    flat = latents.flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


def diagonal_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between diagonal Gaussians fitted to two sets of feature vectors [N, D]."""
    return float(((a.mean(0) - b.mean(0)) ** 2 + (a.std(0) - b.std(0)) ** 2).sum())


def paired_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ||x - reference|| / ||reference|| (the same prompt and noise)."""
    diff = (x - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1).clamp_min(1e-8)).mean())


def section_drift(latents: torch.Tensor, window: int) -> list[float]:
    """Per section: the RMS change of the channel statistics from the first section (0 for it), averaged
    over samples (the drift of §3.5 / Figure 6, in latent space)."""
    sections = latents.shape[2] // window
    feats = [channel_features(latents[:, :, k * window : (k + 1) * window]) for k in range(sections)]
    return [float((f - feats[0]).pow(2).mean(1).sqrt().mean()) for f in feats]


def world_measures(samples: Samples) -> dict[str, float]:
    """Mean shapes-world measures of decoded videos against their captions."""
    return mean_metrics([video_metrics(v, c) for v, c in zip(samples.frames, samples.captions)])


def spread(values: list[float]) -> dict:
    """Mean and sample std over the seeds that have the number: a ratio with nothing to count (no sample's
    first section holds the shape) is NaN (None in a report read back) for its seed, left out and counted in
    ``seeds`` (None: no seed)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]  # None: NaN read back from JSON
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "values": [None if v is None or math.isnan(v) else v for v in values],
        "seeds": len(finite),
    }


# ---------------------------------------------------------------------------------------------- reports
def candidates(recipe: ToyRecipe) -> list[str]:
    """The few-step generators compared with the teacher, in table order."""
    return ["undistilled", *(["ode_init"] if recipe.students else []), *recipe.students, *recipe.dmd_only]


def distill_report(runs: dict[str, Path], recipe: ToyRecipe) -> dict:
    """Teacher (Helios-Mid, many steps) vs the few-step generators: the undistilled one (Helios-Mid's
    weights), the ODE-init student and the DMD + GAN students; same prompts, same noise. Also the
    Fréchet distance to Helios-Base's many-step samples (the distribution DMD's real score targets)."""
    prompts = eval_prompts(recipe.prompts)
    cpu = torch.device("cpu")
    args = (prompts, recipe.sample_seeds, recipe.distill_sections)
    mid = load_for_inference(runs["mid"], cpu)
    few = student_sampler(recipe)
    samples = {
        "teacher": sample(mid, teacher_sampler(recipe), *args),
        "base": sample(load_for_inference(runs["base"], cpu), base_sampler(recipe), *args),
    }
    for name in candidates(recipe):
        samples[name] = sample(
            mid if name == "undistilled" else load_for_inference(runs[name], cpu), few, *args
        )
    ref = samples["teacher"]
    ref_feats, base_feats = channel_features(ref.latents), channel_features(samples["base"].latents)
    report = {}
    for name in candidates(recipe):
        s = samples[name]
        report[name] = {
            "paired_error": paired_error(s.latents, ref.latents),
            "frechet": diagonal_frechet(channel_features(s.latents), ref_feats),
            "frechet_base": diagonal_frechet(channel_features(s.latents), base_feats),
            "world": world_measures(s),
        }
    report["teacher"] = {"world": world_measures(ref)}
    clips = real_clips(recipe.prompts, ref.frames.shape[2], ref.frames.shape[-1])
    report["real"] = {"world": world_measures(Samples(clips, clips, prompts))}
    report["_samples"] = samples  # for the figure; dropped from the JSON
    return report


LONG_KEYS = (
    "shape_kept_in_every_section",
    "kept_when_first_section_held",
    "present_frames",
    "worst_section_frames",  # issue #35's target: each section's frames pooled over the samples, >= 95 %
    "form_match",
    "moves_along",
)


def long_video_report(runs: dict[str, Path], recipe: ToyRecipe) -> dict[str, dict]:
    """Every generator's ``recipe.long_sections``-section videos (``recipe.long_captions`` captions spread
    over the world x ``recipe.long_seeds``) judged by the object measures (bench/tiny_long_video.py's
    verdict): the teacher (the Mid, many steps, CFG), the Base (many steps, CFG; the real score's
    samples), the Bases of ``recipe.history_ablations`` (the same sampler), each few-step generator, and
    real clips through the VAE."""
    from bench.tiny_long_video import long_videos, real_long_videos, spread_captions, verdict

    captions, seeds, sections = spread_captions(recipe.long_captions), recipe.long_seeds, recipe.long_sections
    cpu = torch.device("cpu")
    mid = load_for_inference(runs["mid"], cpu)
    generators = [("teacher", mid, teacher_sampler(recipe))]
    for name in ["base", *recipe.history_ablations]:
        generators.append((name, load_for_inference(runs[name], cpu), base_sampler(recipe)))
    few = student_sampler(recipe)
    for name in candidates(recipe):
        generators.append((name, mid if name == "undistilled" else load_for_inference(runs[name], cpu), few))
    report = {
        name: verdict(long_videos(model, sampler, captions, seeds, sections)[0])
        for name, model, sampler in generators
    }
    report["real"] = verdict(real_long_videos(mid, captions, seeds, sections))
    return report


def drift_report(root: Path, recipe: ToyRecipe, seed: int, stage1: Path | None) -> dict[str, dict]:
    """Stage 1 per variant: long videos' section drift and per-section shapes-world measures."""
    prompts = eval_prompts(recipe.prompts)
    sampler = SamplerConfig(kind="unipc", steps=[recipe.drift_steps], guidance_scale=5.0)
    out = {}
    for name, overrides in recipe.drift_variants.items():
        if not overrides and stage1 is not None:
            run = stage1  # the distillation chain's stage 1 is the default variant
        else:
            run = train_base(root / f"drift_{slug(name)}", overrides, recipe, seed)
        model = load_for_inference(run, torch.device("cpu"))
        s = sample(model, sampler, prompts, recipe.sample_seeds, recipe.drift_sections)
        window = model.layout.window
        per_frames = s.frames.shape[2] // recipe.drift_sections
        first, last = (
            world_measures(
                Samples(s.latents, s.frames[:, :, k * per_frames : (k + 1) * per_frames], s.captions)
            )
            for k in (0, recipe.drift_sections - 1)
        )  # only the first and last sections are reported
        out[name] = {"drift": section_drift(s.latents, window), "world_first": first, "world_last": last}
    return out


# ---------------------------------------------------------------------------------------------- the command
def run_experiment(out: Path, recipe: ToyRecipe, log=print) -> dict:
    """Every seed's chain, the two reports, the seed spread; ``out/report.json``, ``out/table.md`` and
    ``out/figure.png``."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed, figure_samples = [], None
    for seed in recipe.seeds:
        root = out / f"seed{seed}"
        t0 = time.perf_counter()
        runs = distill_chain(root, recipe, seed)
        log(f"seed {seed}: recipe trained ({time.perf_counter() - t0:.0f} s)")
        distill = distill_report(runs, recipe)
        samples = distill.pop("_samples")
        figure_samples = figure_samples or samples
        drift = drift_report(root, recipe, seed, runs["base"])
        per_seed.append({"seed": seed, "distill": distill, "drift": drift})
        if recipe.long_sections:
            per_seed[-1]["long"] = long_video_report(runs, recipe)
        errors = ", ".join(f"{n} {distill[n]['frechet']:.3f}" for n in candidates(recipe))
        log(f"seed {seed}: Fréchet to the teacher: {errors} ({time.perf_counter() - t0:.0f} s)")
    report = {"recipe": asdict(recipe), "seeds": per_seed, "summary": summarize(per_seed)}
    report["seconds"] = time.perf_counter() - start
    write_report(out, report)
    save_figure(figure_samples, candidates(recipe), out / "figure.png")
    return report


def write_report(out: Path, report: dict) -> None:
    """``out/report.json`` (strict JSON: NaN as null) and ``out/table.md``."""
    (out / "report.json").write_text(json.dumps(strict_json(report), indent=1, allow_nan=False))
    (out / "table.md").write_text(format_tables(report) + "\n")


def merge_reports(reports: list[dict]) -> dict:
    """Reports of the same recipe run for different seeds (separate commands, jobs or machines) as one: the
    per-seed numbers in seed order, the seed spread recomputed over all of them, the seconds summed. The
    recipes must agree but for their seeds, and no seed may come twice."""
    if not reports:
        raise ValueError("nothing to merge")
    for i, report in enumerate(reports):
        lacking = [
            k for k in ("recipe", "seeds", "seconds") if not isinstance(report, dict) or k not in report
        ]
        if lacking:
            raise ValueError(f"report {i} is not a toy experiment's report: no {', '.join(lacking)}")
    first = {k: v for k, v in reports[0]["recipe"].items() if k != "seeds"}
    for i, report in enumerate(reports[1:], 1):
        other = {k: v for k, v in report["recipe"].items() if k != "seeds"}
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise ValueError(f"report {i} ran another recipe than report 0: {', '.join(differ)} differ")
    per_seed = sorted((s for r in reports for s in r["seeds"]), key=lambda s: s["seed"])
    seeds = [s["seed"] for s in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed comes twice: {seeds}")
    return {
        "recipe": {**reports[0]["recipe"], "seeds": seeds},
        "seeds": per_seed,
        "summary": summarize(per_seed),
        "seconds": sum(r["seconds"] for r in reports),
    }


def summarize(per_seed: list[dict]) -> dict:
    """Seed mean and spread of every headline number."""
    summary: dict[str, dict] = {}
    first = per_seed[0]
    for name, row in first["distill"].items():
        keys = [k for k in ("paired_error", "frechet", "frechet_base") if k in row]
        keys += [f"world/{k}" for k in WORLD_KEYS]
        for key in keys:
            values = [_get(s["distill"][name], key) for s in per_seed]
            summary[f"distill/{name}/{key}"] = spread(values)
    for name in first.get("long", {}):
        for key in LONG_KEYS:
            summary[f"long/{name}/{key}"] = spread([s["long"][name][key] for s in per_seed])
    for variant in first["drift"]:
        drifts = [s["drift"][variant]["drift"] for s in per_seed]
        for k in sorted({1, len(drifts[0]) // 2, len(drifts[0]) - 1}):
            summary[f"drift/{variant}/section_{k + 1}"] = spread([d[k] for d in drifts])
        summary[f"drift/{variant}/mean"] = spread([statistics.fmean(d[1:]) for d in drifts])
        for key in WORLD_KEYS:
            summary[f"drift/{variant}/world_last/{key}"] = spread(
                [s["drift"][variant]["world_last"][key] for s in per_seed]
            )
    return summary


WORLD_KEYS = ("palette_error", "shape_colour_match", "objects")


def _get(row: dict, key: str) -> float:
    return row["world"][key.split("/", 1)[1]] if key.startswith("world/") else row[key]


def _cell(summary: dict, key: str) -> str:
    v = summary.get(key)
    if v is None:
        return ""
    if v["mean"] is None:
        return "none of the seeds"
    cell = f"{v['mean']:.3f} ± {v['std']:.3f}"
    return cell if v["seeds"] == len(v["values"]) else f"{cell} ({v['seeds']} of {len(v['values'])} seeds)"


def format_tables(report: dict) -> str:
    """The headline numbers as Markdown tables (mean ± std over the seeds)."""
    summary, n = report["summary"], len(report["seeds"])
    dist = report["seeds"][0]["distill"]
    lines = [
        f"Distillation ({n} seeds; latent measures against the teacher's many-step samples, lower is "
        "closer):",
        "",
        "| generator | paired error | Fréchet (teacher) | Fréchet (Base) | palette error | colour match "
        "| objects |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dist:
        cells = [
            _cell(summary, f"distill/{name}/{k}")
            for k in ("paired_error", "frechet", "frechet_base", *(f"world/{w}" for w in WORLD_KEYS))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    long = report["seeds"][0].get("long", {})
    if long:
        sections = report["recipe"]["long_sections"]
        lines += [
            "",
            f"Long videos ({n} seeds; {sections} sections, the object measures of bench/tiny_long_video.py):",
            "",
            "| generator | samples keeping the shape in every section | the same, of those whose first "
            "section holds it | frames with the shape | the worst section's frames with it "
            "| the caption's form | moving the caption's way |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in long:
            cells = [_cell(summary, f"long/{name}/{k}") for k in LONG_KEYS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    variants = list(report["seeds"][0]["drift"])
    if not variants:
        return "\n".join(lines)
    sections = sorted(
        (k for k in summary if k.startswith(f"drift/{variants[0]}/section_")),
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    heads = [k.rsplit("/", 1)[1].replace("_", " ") for k in sections]
    lines += [
        "",
        f"Drift of stage-1 long videos ({n} seeds; RMS change of the latent channel statistics from "
        "section 1):",
        "",
        "| variant | "
        + " | ".join(heads)
        + " | mean | last section: palette error | colour match | objects |",
        "|---|" + "---|" * (len(heads) + 4),
    ]
    for v in variants:
        keys = [s.replace(variants[0], v, 1) for s in sections] + [f"drift/{v}/mean"]
        keys += [f"drift/{v}/world_last/{w}" for w in WORLD_KEYS]
        lines.append(f"| {v} | " + " | ".join(_cell(summary, k) for k in keys) + " |")
    return "\n".join(lines)


def save_figure(samples: dict, names: list[str], path: Path, frames: int = 5) -> None:
    """Rows: a real clip, the teacher, then ``names`` (first prompt, first sampling seed), labelled;
    ``frames`` frames across the video."""
    from PIL import Image, ImageDraw

    teacher = samples["teacher"]
    real = real_clips(1, teacher.frames.shape[2], teacher.frames.shape[-1])[0]
    rows = [("real", real), ("teacher", teacher.frames[0]), *((n, samples[n].frames[0]) for n in names)]
    picks = [round(i * (real.shape[1] - 1) / (frames - 1)) for i in range(frames)]
    grid = torch.cat([torch.cat([row[:, t] for t in picks], dim=2) for _, row in rows], dim=1)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    scale, label_w, h = 2, 150, real.shape[-2]
    image = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (image.width + label_w, image.height), "white")
    canvas.paste(image, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, _) in enumerate(rows):
        draw.text((6, i * h * scale + h * scale // 2 - 6), name, fill="black")
    canvas.save(path)
