"""``python -m helios.ode_pairs teacher=PATH shards=DIR output=DIR``: the teacher's ODE pairs for Staged
ODE Init (§3.4.2).

``source=rollout`` (default; how the released Helios-Distilled was initialised, the reference's
``get_ode-pairs.py``): per caption of the shards, the teacher (Helios-Mid: a stage-2 run / checkpoint or a
diffusers directory) samples a T2V video of ``sections`` sections with the Pyramid UniPC sampler (CFG against
the negative prompt), each section conditioned on its earlier ones; every (section, pyramid stage) keeps the
teacher's states at the distilled schedule's timesteps (the nearest of its own steps) and the stage's end.
``source=clips``: one section per real clip, on that clip's history (Representation Control formats drawn as
in training, no corruption), keeping each stage's start and end.

One output shard per input shard; the ranks claim input shards one at a time
(:class:`~helios.data.work_queue.WorkQueue`: a slow or dead rank delays nobody); a shard is done when
``.progress/<shard>.json`` exists, so a rerun continues; ``pairs=N`` samples only the first shards that make
N pairs; ``report.json`` sums up (written by the rank that finishes the last shard).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

import torch

from helios.config.schema import OdePairsConfig, ParallelConfig, SamplerConfig, TaskConfig, TrainerConfig
from helios.core.history import apply_tasks, draw_tasks
from helios.data.dataset import random_section_window
from helios.data.ode_pair_shards import ODE_MEMBERS, TRAJECTORY_MEMBERS, encode_pair
from helios.data.prepare_job import EMPTY_PROMPT_FILE, NEGATIVE_PROMPT_FILE, SETTINGS_FILE, load_empty_prompt
from helios.data.shards import ShardIndex, list_shards, trim_embeds, write_shard
from helios.data.work_queue import WorkQueue
from helios.infra.distributed import setup, teardown
from helios.loading import load_for_inference
from helios.model.encoders import encode_prompts
from helios.sampling.autoregressive import sample_video
from helios.sampling.pipeline import build_section_sampler
from helios.sampling.prompts import PromptSchedule

log = logging.getLogger("helios.ode_pairs")


@torch.no_grad()
def rollouts_for_shard(shard: Path, out: Path, cfg: OdePairsConfig, model, negative: torch.Tensor) -> dict:
    """``source=rollout``: one T2V video of the teacher per caption of ``shard``, its trajectory states at the
    distilled schedule's timesteps (:func:`keep_dmd_states`)."""
    layout = model.layout
    index = ShardIndex([shard])
    sampler = build_section_sampler(cfg.sampler, tuple(model.transformer.config.patch_size))
    dmd = build_section_sampler(
        SamplerConfig(
            kind="dmd", steps=list(cfg.dmd_steps), amplify_first=cfg.amplify_first, shift_type="linear"
        ),
        tuple(model.transformer.config.patch_size),
    )
    device = next(model.transformer.parameters()).device
    samples = []
    for i in range(len(index)):
        item = index.read(i)
        c, _, h, w = item["latents"].shape
        gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{shard.name}:{item['key']}".encode()))
        emb = torch.zeros(1, cfg.max_sequence_length, item["prompt_embeds"].shape[-1])
        emb[0, : item["prompt_embeds"].shape[0]] = item["prompt_embeds"][: cfg.max_sequence_length]
        trajectories: list = []
        sample_video(
            model.transformer,
            layout,
            sampler,
            PromptSchedule([(0, emb)]),
            negative,
            cfg.sections,
            (h, w),
            gen,
            device=device,
            trajectories=trajectories,
            anchor_from_second_section=cfg.sampler.anchor_from_second_section,
        )
        arrays, kept = {"prompt_embeds": trim_embeds(emb[0])}, {}
        for k, section in enumerate(trajectories):
            for stage, timesteps, states in section:
                targets = dmd.stage_timesteps(stage, tuple(states[0].shape), first_section=k == 0)
                picked, ts = keep_dmd_states(timesteps, states, targets)
                arrays[f"s{k}_stage{stage}_states"] = picked[:, 0]
                arrays[f"s{k}_stage{stage}_t"] = ts
                kept[f"s{k}_stage{stage}"] = ts.tolist()
        meta = {
            "format": "trajectory",
            "source": f"{shard.name}:{item['key']}",
            "sections": cfg.sections,
            "stages": len(cfg.sampler.steps),
            "timesteps": kept,
            "latent_shape": [c, layout.window, h, w],
            "caption": item["meta"].get("caption"),
            "anchor_section": 1 if cfg.sampler.anchor_from_second_section else 0,
        }
        samples.append(encode_pair(f"{shard.stem}-{i:05d}", arrays, meta))
    if samples:
        write_shard(out / f"ode-{shard.stem}.tar", samples, TRAJECTORY_MEMBERS)
    return {"shard": shard.name, "written": len(samples), "skipped_too_short": 0}


def keep_dmd_states(
    timesteps: torch.Tensor, states: list[torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's states at the steps nearest to the distilled schedule's ``targets`` (the reference keeps
    those, not the targets themselves), then the stage's end: ([len(targets) + 1, ...], their timesteps)."""
    nearest = [int(torch.argmin((timesteps - t).abs())) for t in targets.tolist()]
    return torch.stack([states[j] for j in nearest] + [states[-1]]), timesteps[nearest].float()


@torch.no_grad()
def pairs_for_shard(shard: Path, out: Path, cfg: OdePairsConfig, model, empty: torch.Tensor) -> dict:
    """``source=clips``: one section per real clip of ``shard``, each pyramid stage's start and end."""

    layout = model.layout
    index = ShardIndex([shard])
    sampler = build_section_sampler(cfg.sampler, tuple(model.transformer.config.patch_size))
    device = next(model.transformer.parameters()).device
    dtype = next(model.transformer.parameters()).dtype
    samples, skipped = [], 0
    tasks_cfg = TaskConfig(**cfg.tasks)
    for i in range(len(index)):
        item = index.read(i)
        latents = item["latents"]
        fmt, _ = index.latent_format(i)
        if fmt != model.latent_format:
            raise ValueError(
                f"shards={cfg.shards} hold {fmt}-format latents, the teacher {cfg.teacher} was trained on "
                f"the {model.latent_format} format: prepare the shards with clip.format={model.latent_format}"
            )
        gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{shard.name}:{item['key']}".encode()))
        if latents.shape[1] < (layout.window if fmt == "sections" else layout.clip_frames):
            skipped += 1
            continue
        if fmt == "sections":  # a section drawn as in training, its history zero-padded
            clip, first, _, real = random_section_window(latents, layout.num_history, layout.window, gen)
        else:
            clip, first, real = latents[:, : layout.clip_frames], latents[:, :1], layout.num_history
        history, _ = layout.split_clip(clip[None])
        tasks = draw_tasks(1, tasks_cfg, gen)
        history, anchor, valid = apply_tasks(
            history, first[None], tasks, layout, gen, torch.tensor([real]), section_format=fmt == "sections"
        )
        inputs = {k: v.to(device) for k, v in layout.model_inputs(history, anchor).items()}
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        emb = torch.zeros(1, cfg.max_sequence_length, item["prompt_embeds"].shape[-1])
        emb[0, : item["prompt_embeds"].shape[0]] = item["prompt_embeds"][: cfg.max_sequence_length]

        def model_fn(x, t, e, inputs=inputs):
            return model.transformer(
                hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=e, **inputs, return_dict=False
            )[0]

        h, w = latents.shape[-2:]
        noise = sampler.initial_noise((1, latents.shape[0], layout.window, h, w), gen, device)
        record: list = []
        first_section = not bool(valid.any())  # empty history: the first section's amplified schedule
        sampler(
            model_fn,
            noise,
            emb.to(device, dtype),
            empty.to(device, dtype),
            gen,
            record=record,
            first_section=first_section,
        )
        arrays = {
            "noise": noise[0],
            "history": history[0],
            "anchor": anchor[0],
            "prompt_embeds": trim_embeds(emb[0]),
        }
        for k, start, end in record:
            arrays[f"stage{k}_start"] = start[0]
            arrays[f"stage{k}_end"] = end[0]
        meta = {
            "source": f"{shard.name}:{item['key']}",
            "task": int(tasks[0]),
            "history_frames": int(valid.sum()),
            "stages": len(record),
            "steps": list(cfg.sampler.steps),
            "guidance_scale": cfg.sampler.guidance_scale,
            "caption": item["meta"].get("caption"),
        }
        samples.append(encode_pair(f"{shard.stem}-{i:05d}", arrays, meta))
    if samples:
        write_shard(out / f"ode-{shard.stem}.tar", samples, ODE_MEMBERS)
    return {"shard": shard.name, "written": len(samples), "skipped_too_short": skipped}


def prepared_negative_prompt(shards: str) -> str | None:
    """The negative prompt ``helios.prepare`` encoded next to the shards (its settings file), or None."""
    settings = Path(shards) / SETTINGS_FILE
    return json.loads(settings.read_text()).get("negative_prompt") if settings.exists() else None


def unconditional_input(cfg: OdePairsConfig, model) -> torch.Tensor:
    """CFG's unconditional branch for the teacher [1, L, D]: the sampler's negative prompt, as prepare encoded
    it where it can (encoded here otherwise), or zero embeddings when it is null (caption dropout's input)."""
    text = cfg.sampler.negative_prompt
    padded = torch.zeros(1, cfg.max_sequence_length, model.text_encoder.config.d_model)
    if text is None:
        return padded
    stored = load_empty_prompt(cfg.shards, NEGATIVE_PROMPT_FILE if text else EMPTY_PROMPT_FILE)
    if stored is None or (text and text != prepared_negative_prompt(cfg.shards)):
        stored = encode_prompts(model.tokenizer, model.text_encoder, [text], cfg.max_sequence_length)[0]
    padded[0, : min(len(stored), cfg.max_sequence_length)] = stored[: cfg.max_sequence_length]
    return padded


def shards_for(shards: list[Path], pairs: int | None) -> list[Path]:
    """The input shards a job samples: all of them, or the first ones whose clips make ``pairs`` pairs (what
    the ODE-init phase consumes: its steps x global batch)."""
    if pairs is None:
        return shards
    chosen, total = [], 0
    for shard in shards:
        if total >= pairs:
            break
        chosen.append(shard)
        total += len(ShardIndex([shard]))
    if total < pairs:
        log.warning("the shards hold %d clips, fewer than pairs=%d: one pair per clip", total, pairs)
    return chosen


def run(cfg: OdePairsConfig) -> dict:

    dist = setup(ParallelConfig(), TrainerConfig(device=cfg.device))
    try:
        model = load_for_inference(cfg.teacher, dist.device)
        padded = unconditional_input(cfg, model)
        make = rollouts_for_shard if cfg.source == "rollout" else pairs_for_shard
        out = Path(cfg.output)
        shards = shards_for(list_shards(cfg.shards), cfg.pairs)
        queue = WorkQueue(out / ".progress", [s.stem for s in shards], dist.rank, dist.world_size)
        by_name = {s.stem: s for s in shards}
        t0, n, written = time.monotonic(), 0, 0
        for name in queue.claims():
            record = make(by_name[name], out, cfg, model, padded)
            queue.finish(name, record)
            n, written = n + 1, written + record["written"]
            log.info(
                "rank %d: %s -> %d pairs (%d shards so far, %d left, %.2f pairs/s)",
                dist.rank,
                name,
                record["written"],
                n,
                len(queue.remaining()),
                written / max(time.monotonic() - t0, 1e-9),
            )
        if queue.remaining():  # other ranks still sample their last shards; the last one writes the report
            return {}
        records = queue.records()
        report = {
            "shards": len(records),
            "pairs": sum(r["written"] for r in records),
            "skipped_too_short": sum(r["skipped_too_short"] for r in records),
            "teacher": str(cfg.teacher),
            "source": cfg.source,
            "sampler": {"steps": list(cfg.sampler.steps), "guidance_scale": cfg.sampler.guidance_scale},
        }
        tmp = out / f"report.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out / "report.json")
        return report
    finally:
        teardown()
