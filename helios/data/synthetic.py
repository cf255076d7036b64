"""A small captioned video set the project makes itself: coloured shapes moving on a background.

Written as real H.264 mp4 files plus ``captions.jsonl`` (the input format of ``helios.prepare``),
so the tiny job exercises the same decode -> VAE -> shard path as user data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
}
BACKGROUNDS = {"blue": (30, 50, 140), "black": (10, 10, 10), "gray": (110, 110, 110)}
SHAPES = ("circle", "square")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def _pick(options, generator: torch.Generator):
    keys = list(options)
    return keys[int(torch.randint(len(keys), (1,), generator=generator))]


def render_clip(
    num_frames: int, height: int, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """One clip as a float tensor [3, T, H, W] in [-1, 1] and its caption."""
    shape, color, bg, direction = (
        _pick(SHAPES, generator),
        _pick(COLORS, generator),
        _pick(BACKGROUNDS, generator),
        _pick(DIRECTIONS, generator),
    )
    radius = max(3, int(min(height, width) * (0.12 + 0.1 * float(torch.rand(1, generator=generator)))))
    speed = 1.0 + 2.0 * float(torch.rand(1, generator=generator))
    dx, dy = DIRECTIONS[direction]
    cx = width * (0.3 + 0.4 * float(torch.rand(1, generator=generator)))
    cy = height * (0.3 + 0.4 * float(torch.rand(1, generator=generator)))
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    frames = torch.empty(num_frames, height, width, 3)
    fg, bgc = (
        torch.tensor(COLORS[color], dtype=torch.float32),
        torch.tensor(BACKGROUNDS[bg], dtype=torch.float32),
    )
    for t in range(num_frames):
        px = (cx + dx * speed * t) % width
        py = (cy + dy * speed * t) % height
        if shape == "circle":
            mask = (xx - px) ** 2 + (yy - py) ** 2 <= radius**2
        else:
            mask = ((xx - px).abs() <= radius) & ((yy - py).abs() <= radius)
        frames[t] = torch.where(mask[..., None], fg, bgc)
    video = frames.permute(3, 0, 1, 2) / 127.5 - 1.0
    caption = f"a {color} {shape} moving {direction} on a {bg} background"
    return video, caption


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
    out_dir: str | Path, num_videos: int, num_frames: int, height: int, width: int, fps: int, seed: int
) -> Path:
    """Write ``num_videos`` mp4 files and ``captions.jsonl`` into ``out_dir``; return the jsonl path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(num_videos):
        video, caption = render_clip(num_frames, height, width, gen)
        name = f"shapes_{i:05d}.mp4"
        write_mp4(out / name, video, fps)
        lines.append(json.dumps({"video": name, "caption": caption, "source": "synthetic"}))
    captions = out / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n")
    return captions
