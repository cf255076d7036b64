"""``python -m helios.generate checkpoint=PATH prompt="..." num_frames=N output=FILE.mp4``.

Long videos from a training checkpoint or a diffusers-format Helios model: T2V, I2V (``image=``),
V2V (``video=``), a file of prompts, or timed prompts for interactive generation. Writes the mp4 and a
JSON of per-section drift statistics next to it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import torch

from helios.config.cli import command
from helios.config.schema import GenerateConfig

log = logging.getLogger("helios.generate")


def _read_timed_prompts(path: str, fps: int, frames_per_section: int) -> list[tuple[int, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if "time" not in row or "prompt" not in row:
                raise ValueError(f"{path}: needs the columns time,prompt")
            section = math.floor(float(row["time"]) * fps / frames_per_section)
            rows.append((section, row["prompt"]))
    rows.sort()
    if not rows or rows[0][0] != 0:
        raise ValueError(f"{path}: the first prompt must start at time 0")
    return rows


def _load_pixels(path: str, height: int, width: int, frames: int | None) -> torch.Tensor:
    from helios.data.video import decode_clip, resize_center_crop

    if frames is None:  # an image
        import numpy as np
        from PIL import Image

        img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).unsqueeze(0)
        return resize_center_crop(img, height, width).unsqueeze(0)
    clip, _ = decode_clip(path, frames, height, width)
    return clip.unsqueeze(0)


def run(cfg: GenerateConfig) -> list[Path]:
    from diffusers.utils import export_to_video

    from helios.model.inference import load_for_inference
    from helios.sampling.pipeline import generate_video

    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = (
        torch.bfloat16
        if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
        else torch.float32
    )
    model = load_for_inference(cfg.checkpoint, device, dtype)
    height = cfg.height or (model.size[0] if model.size else 384)
    width = cfg.width or (model.size[1] if model.size else 640)
    sampler = cfg.sampler
    frames_per_section = 4 * model.layout.window
    if cfg.timed_prompts:
        jobs = [_read_timed_prompts(cfg.timed_prompts, cfg.fps, frames_per_section)]
    elif cfg.prompts_file:
        lines = [
            x.strip() for x in Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines() if x.strip()
        ]
        jobs = [[(0, p)] for p in lines]
    else:
        jobs = [[(0, cfg.prompt)]]
    image = _load_pixels(cfg.image, height, width, None) if cfg.image else None
    video = None
    if cfg.video:
        cond_frames = 4 * (model.layout.num_history - 1) + 1
        video = _load_pixels(cfg.video, height, width, cond_frames)
    outputs = []
    base = Path(cfg.output)
    for i, prompts in enumerate(jobs):
        out = base if len(jobs) == 1 else base.with_name(f"{base.stem}_{i:03d}{base.suffix}")
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        result = generate_video(
            model.transformer,
            model.vae,
            model.tokenizer,
            model.text_encoder,
            model.layout,
            sampler,
            prompts,
            cfg.num_frames,
            height,
            width,
            generator,
            model.max_sequence_length,
            image,
            video,
            cfg.seed,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        frames = ((result.frames[0].permute(1, 2, 3, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy()
        export_to_video(list(frames), str(out), fps=cfg.fps)
        stats = {**result.stats, "prompts": prompts, "seed": cfg.seed, "height": height, "width": width}
        out.with_suffix(".json").write_text(json.dumps(stats, indent=2))
        log.info("wrote %s (%d frames) and %s", out, frames.shape[0], out.with_suffix(".json"))
        outputs.append(out)
    return outputs


_main = command("generate", GenerateConfig, run)


if __name__ == "__main__":
    _main()
