"""Encode captioned videos into latent shards, and the self-made tiny dataset built that way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from helios.config.schema import DataConfig, ModelConfig
from helios.data.shards import COMPLETE_MARKER, ShardWriter
from helios.data.video import VideoDecodeError, decode_clip

log = logging.getLogger(__name__)

VAE_TEMPORAL = 4  # Wan VAE: 4x temporal compression, the first frame on its own


def video_frames_for(latent_frames: int) -> int:
    """Pixel frames that the causal Wan VAE encodes into ``latent_frames`` latents."""
    return VAE_TEMPORAL * (latent_frames - 1) + 1


def read_captions(captions_path: str | Path) -> list[dict]:
    path = Path(captions_path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def encode_captioned_videos(
    captions_path: str | Path,
    out_dir: str | Path,
    vae,
    tokenizer,
    text_encoder,
    *,
    latent_frames: int,
    height: int,
    width: int,
    fps: float | None,
    max_sequence_length: int,
    samples_per_shard: int = 64,
) -> dict:
    """Decode, VAE-encode and text-encode every entry of a ``captions.jsonl`` into shards.

    Undecodable videos are skipped and reported (``report.json``), never fatal.
    """
    from helios.model.encoders import encode_prompts, encode_video

    captions_path = Path(captions_path)
    writer = ShardWriter(out_dir, samples_per_shard=samples_per_shard)
    skipped: list[dict] = []
    written = 0
    num_frames = video_frames_for(latent_frames)
    for i, entry in enumerate(read_captions(captions_path)):
        video_path = captions_path.parent / entry["video"]
        try:
            clip = decode_clip(str(video_path), num_frames, height, width, fps)
        except VideoDecodeError as err:
            skipped.append({"video": entry["video"], "reason": str(err)})
            continue
        latents = encode_video(vae, clip.unsqueeze(0))[0]
        embeds = encode_prompts(tokenizer, text_encoder, [entry["caption"]], max_sequence_length)[0]
        meta = {k: v for k, v in entry.items() if k != "video"} | {"video": entry["video"], "fps": fps}
        writer.add(f"{i:08d}", latents, embeds, meta)
        written += 1
    shards = writer.close()
    report = {"written": written, "shards": len(shards), "skipped": skipped}
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report


def synthetic_fingerprint(data: DataConfig, model: ModelConfig, latent_frames: int) -> str:
    key = json.dumps(
        {
            "synthetic": asdict(data.synthetic),
            "vae": asdict(model.vae),
            "text": asdict(model.text_encoder),
            "latent_frames": latent_frames,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_synthetic_shards(data: DataConfig, model: ModelConfig, latent_frames: int, is_main: bool) -> Path:
    """Build (once, cached by fingerprint) the moving-shapes mp4 set and its latent shards.

    Only the main process builds; the caller synchronises ranks before reading.
    """
    from helios.data.synthetic import make_synthetic_videos
    from helios.model.encoders import build_text_encoder, build_vae

    final_root = Path(data.cache_dir) / synthetic_fingerprint(data, model, latent_frames)
    if (final_root / "shards" / COMPLETE_MARKER).exists() or not is_main:
        return final_root / "shards"
    # Build in a private directory and rename: concurrent jobs sharing the cache never see a partial set.
    root = final_root.with_name(f"{final_root.name}.tmp-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    shard_dir = root / "shards"
    syn = data.synthetic
    frames = video_frames_for(latent_frames)
    log.info("building the synthetic dataset in %s (%d videos x %d frames)", root, syn.num_videos, frames)
    captions = make_synthetic_videos(
        root / "videos", syn.num_videos, frames, syn.height, syn.width, syn.fps, syn.seed
    )
    vae = build_vae(model.vae)
    tokenizer, text_encoder = build_text_encoder(model.text_encoder)
    report = encode_captioned_videos(
        captions,
        shard_dir,
        vae,
        tokenizer,
        text_encoder,
        latent_frames=latent_frames,
        height=syn.height,
        width=syn.width,
        fps=None,
        max_sequence_length=model.text_encoder.max_sequence_length,
    )
    if report["skipped"]:
        raise RuntimeError(f"synthetic videos failed to decode: {report['skipped'][:3]}")
    (shard_dir / COMPLETE_MARKER).write_text("ok\n")
    try:
        os.replace(root, final_root)
    except OSError:  # another job finished first; its copy is identical
        shutil.rmtree(root, ignore_errors=True)
    return final_root / "shards"
