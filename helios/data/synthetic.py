"""A small captioned video set the project makes itself: coloured shapes moving on a background.

Written as real H.264 mp4 files plus ``captions.jsonl`` (the input format of ``helios.prepare``),
so the tiny job exercises the same decode -> VAE -> shard path as user data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from helios.config.schema import DataConfig, ModelConfig, TrainConfig
from helios.data.prepare_job import ClipSpec, prepare, write_report
from helios.model.encoders import build_text_encoder, build_vae, trained_tiny_vae_digest
from helios.world.shapes import all_scenes, render_clip


def write_mp4(path: Path, video: torch.Tensor, fps: int) -> None:
    """[3, T, H, W] in [-1, 1] -> H.264 mp4 (yuv420p)."""
    import imageio.v2 as imageio

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    with imageio.get_writer(
        str(path),
        fps=fps,
        codec="libx264",
        quality=8,
        macro_block_size=16,
        ffmpeg_log_level="error",
        pixelformat="yuv420p",
    ) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))


def make_synthetic_videos(
    out_dir: str | Path,
    num_videos: int,
    num_frames: int,
    height: int,
    width: int,
    fps: int,
    seed: int,
    *,
    radius: tuple[float, float],
) -> Path:
    """Write ``num_videos`` mp4 files and ``captions.jsonl`` into ``out_dir``; return the jsonl path. Clip
    i shows scene ``i mod 96`` of the world's scenes in an order drawn from ``seed``, its shape's radius
    drawn from ``radius`` (see :func:`render_clip`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
    lines = []
    for i in range(num_videos):
        scene = scenes[order[i % len(scenes)]]
        video, caption = render_clip(num_frames, height, width, gen, scene, radius=radius)
        name = f"shapes_{i:05d}.mp4"
        write_mp4(out / name, video, fps)
        lines.append(json.dumps({"video": name, "caption": caption, "source": "synthetic"}))
    captions = out / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    return captions


def synthetic_clip(data: DataConfig, num_history: int, window: int) -> ClipSpec:
    """The clips the synthetic set is encoded into, in ``data.latent_format``: ``synthetic.sections``
    sections of one window each (by default enough that one section has a full history), or whole clips
    of that many windows (by default two latents longer than a training window, so windows start at
    different offsets)."""
    syn = data.synthetic
    # posterior mode: the trained tiny VAE was fitted on its mode (its posterior spread is untrained);
    # the random one's spread (~1) would bury the latents' (~0.1)
    if data.latent_format == "sections":
        sections = syn.sections or -(-num_history // window) + 1
        return ClipSpec(sections * window, syn.height, syn.width, None, "sections", window, "mode")
    latents = syn.sections * window if syn.sections else num_history + window + 2
    return ClipSpec(latents, syn.height, syn.width, None, "clip", posterior="mode")


def synthetic_shards(cfg: TrainConfig, is_main: bool) -> Path:
    """The synthetic shards a run of ``cfg`` trains on (its history layout and latent format)."""
    spec = synthetic_clip(cfg.data, sum(cfg.history.sizes), cfg.history.window)
    return ensure_synthetic_shards(cfg.data, cfg.model, spec, is_main)


def synthetic_fingerprint(data: DataConfig, model: ModelConfig, spec: ClipSpec) -> str:
    trained = model.vae.source == "tiny" and model.vae.tiny_weights == "trained"
    key = json.dumps(
        {
            "synthetic": asdict(data.synthetic),
            "vae": asdict(model.vae),
            "vae_weights": trained_tiny_vae_digest() if trained else None,
            "text": asdict(model.text_encoder),
            "clip": asdict(spec),
            "version": 7,  # 6: every scene in a seeded order, word-piece tiny tokens; 7: shapes on a torus
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_synthetic_shards(data: DataConfig, model: ModelConfig, spec: ClipSpec, is_main: bool) -> Path:
    """Build once (cached by fingerprint) the moving-shapes mp4 set and its latent shards through the
    same path as ``helios.prepare``. Only the main process builds; the caller synchronises ranks."""

    final = Path(data.cache_dir) / synthetic_fingerprint(data, model, spec)
    if (final / "shards" / "report.json").exists() or not is_main:
        return final / "shards"
    # Build in a private directory and rename: concurrent jobs sharing the cache never see a partial set.
    root = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    syn = data.synthetic
    started = time.monotonic()
    print(  # the first run waits here (a minute or two on a laptop); later runs reuse the cache
        f"first run with this data: writing {syn.num_videos} moving-shapes videos and encoding them into "
        f"latent shards (cached in {final})",
        file=sys.stderr,
        flush=True,
    )
    make_synthetic_videos(
        root / "videos",
        syn.num_videos,
        spec.video_frames,
        syn.height,
        syn.width,
        syn.fps,
        syn.seed,
        radius=tuple(syn.radius),
    )
    tokenizer, text_encoder = build_text_encoder(model.text_encoder)
    prepare(
        root / "videos",
        root / "shards",
        spec,
        build_vae(model.vae),
        tokenizer,
        text_encoder,
        max_sequence_length=model.text_encoder.max_sequence_length,
    )
    report = write_report(root / "shards")
    print(f"synthetic shards ready ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    if report["skipped"]:
        raise RuntimeError(f"synthetic videos failed to encode: {report['skipped_inputs'][:3]}")
    try:
        os.replace(root, final)
    except OSError:  # another job finished first; its copy is identical
        shutil.rmtree(root, ignore_errors=True)
    return final / "shards"
