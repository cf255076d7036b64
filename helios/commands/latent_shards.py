"""``python -m helios.prepare input=PATH output=DIR``: raw videos + captions -> latent shards.

Input: a folder with ``captions.jsonl`` (``{"video": "rel/path.mp4", "caption": "..."}``, extra fields
kept as metadata) or ``captions.csv`` (columns ``video,caption``), or webdataset tar shards with
``mp4`` + ``txt``/``json``. Data-parallel under ``torchrun``; resumable (rerun to continue).
``clip=real model.transformer.path=<Wan2.1-T2V-14B-Diffusers>`` is the paper's recipe.
"""

from __future__ import annotations

import logging

from helios.config.schema import ParallelConfig, PrepareConfig, TrainerConfig
from helios.data.prepare_job import ClipSpec, prepare, write_report
from helios.infra.distributed import setup, teardown
from helios.model.encoders import build_text_encoder, build_vae

log = logging.getLogger("helios.prepare")


def run(cfg: PrepareConfig) -> dict:
    import torch

    dist = setup(ParallelConfig(), TrainerConfig(device=cfg.device))
    try:
        vae = build_vae(cfg.model.vae).to(dist.device)
        tokenizer, text_encoder = build_text_encoder(cfg.model.text_encoder)
        text_encoder.to(dist.device)
        spec = ClipSpec.from_config(cfg.clip)
        workers = cfg.decode_workers
        if workers is None:  # the GPU must not wait for the decoder; on a CPU they share the cores
            workers = 4 if dist.device.type == "cuda" else 0
        with torch.inference_mode():
            summary = prepare(
                cfg.input,
                cfg.output,
                spec,
                vae,
                tokenizer,
                text_encoder,
                max_sequence_length=cfg.model.text_encoder.max_sequence_length,
                samples_per_shard=cfg.samples_per_shard,
                batch_size=cfg.batch_size,
                rank=dist.rank,
                world_size=dist.world_size,
                device=dist.device,
                negative_prompt=cfg.negative_prompt,
                workers=workers,
            )
        log.info("rank %d: %d units, %.2f clips/s", dist.rank, summary["done_now"], summary["clips_per_s"])
        if summary["left"]:  # other ranks still work on their last units; the last one writes the report
            log.info("rank %d: %d units still being encoded by other ranks", dist.rank, summary["left"])
            return {}
        report = write_report(cfg.output)
        if report["written"] == 0:
            raise ValueError(
                f"no clip was written: all {report['skipped']} inputs were skipped "
                f"(each reason is in {cfg.output}/report.json)"
            )
        log.info(
            "%d clips written in %d shards, %d inputs skipped (see %s/report.json)",
            report["written"],
            len(report["shards"]),
            report["skipped"],
            cfg.output,
        )
        return report
    finally:
        teardown()
