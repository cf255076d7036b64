"""``python -m helios.ode_pairs teacher=PATH output=DIR``: ODE-pair shards for Staged ODE Init (§3.4.2).

The teacher (a stage-2 run / checkpoint, or a diffusers Helios-Mid directory) samples one section per
real clip with the Pyramid UniPC sampler, conditioned on that clip's history (Representation Control
formats drawn as in training, no corruption); each sample stores the conditioning (history, anchor,
prompt embedding), the initial noise and the start and end state of every pyramid stage.
One output shard per input shard; ranks take shards r, r+W, ...; a shard is done when
``.progress/<shard>.json`` exists, so a rerun continues; ``report.json`` sums up.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

import torch

from helios.config.schema import OdePairsConfig, ParallelConfig, TaskConfig, TrainerConfig
from helios.core.history import apply_tasks, draw_tasks
from helios.data.dataset import random_section_window
from helios.data.ode_pair_shards import ODE_MEMBERS, encode_pair
from helios.data.prepare_job import load_empty_prompt
from helios.data.shards import ShardIndex, list_shards, trim_embeds, write_shard
from helios.infra.distributed import barrier, setup, teardown
from helios.loading import load_for_inference
from helios.model.encoders import encode_prompts
from helios.sampling.pipeline import build_section_sampler

log = logging.getLogger("helios.ode_pairs")


@torch.no_grad()
def pairs_for_shard(shard: Path, out: Path, cfg: OdePairsConfig, model, empty: torch.Tensor) -> dict:

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


def run(cfg: OdePairsConfig) -> dict:

    dist = setup(ParallelConfig(), TrainerConfig(device=cfg.device))
    try:
        model = load_for_inference(cfg.teacher, dist.device)
        empty = load_empty_prompt(cfg.shards)
        if empty is None:
            empty = encode_prompts(model.tokenizer, model.text_encoder, [""], cfg.max_sequence_length)[0]
        padded = torch.zeros(1, cfg.max_sequence_length, empty.shape[-1])
        padded[0, : min(len(empty), cfg.max_sequence_length)] = empty[: cfg.max_sequence_length]
        out = Path(cfg.output)
        progress = out / ".progress"
        progress.mkdir(parents=True, exist_ok=True)
        shards = list_shards(cfg.shards)
        mine = [s for k, s in enumerate(shards) if k % dist.world_size == dist.rank]
        todo = [s for s in mine if not (progress / f"{s.stem}.json").exists()]
        t0 = time.monotonic()
        for n, shard in enumerate(todo, start=1):
            record = pairs_for_shard(shard, out, cfg, model, padded)
            tmp = progress / f"{shard.stem}.json.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, progress / f"{shard.stem}.json")
            log.info(
                "rank %d: %s -> %d pairs (%d/%d shards, %.1fs)",
                dist.rank,
                shard.name,
                record["written"],
                n,
                len(todo),
                time.monotonic() - t0,
            )
        barrier()
        report = {}
        if dist.is_main:
            records = [json.loads(p.read_text()) for p in sorted(progress.glob("*.json"))]
            report = {
                "shards": len(records),
                "pairs": sum(r["written"] for r in records),
                "skipped_too_short": sum(r["skipped_too_short"] for r in records),
                "teacher": str(cfg.teacher),
                "sampler": {"steps": list(cfg.sampler.steps), "guidance_scale": cfg.sampler.guidance_scale},
            }
            (out / "report.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        teardown()
