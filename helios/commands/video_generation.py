"""``python -m helios.generate checkpoint=PATH prompt="..." num_frames=N output=FILE.mp4``.

Long videos from a training checkpoint or a diffusers-format Helios model: T2V, I2V (``image=``),
V2V (``video=``), a file of prompts, or timed prompts for interactive generation. Writes the mp4 and a
JSON of per-section drift statistics next to it.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import sys
from pathlib import Path

import torch

from helios.config.schema import GenerateConfig
from helios.data.video import decode_clip, resize_center_crop
from helios.loading import load_for_inference
from helios.model.encoders import video_frames_for
from helios.sampling.decode import DECODE_MODES, section_frames
from helios.sampling.pipeline import save_video

log = logging.getLogger("helios.generate")


def _csv_rows(path: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a prompts CSV with every one of ``columns`` filled in; a missing column, an
    empty value or an empty file is a one-line error naming the file and the line."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns {','.join(columns)} (has {reader.fieldnames})")
        rows = []
        for line, row in enumerate(reader, start=2):
            empty = [c for c in columns if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{path}:{line}: no {' or '.join(empty)}")
            rows.append((line, row))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _number(path: str, line: int, column: str, value: str, kind: type) -> float | int:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{path}:{line}: {column} {value!r} is not a {kind.__name__}") from None


REFERENCE_COLUMNS = ("id", "prompt_index", "prompt")  # the reference code's interactive CSV


def read_timed_prompts(path: str) -> list[tuple[float, str]]:
    """``time,prompt`` rows (seconds), sorted; the first prompt starts at time 0. The reference code's
    interactive CSV (``id,prompt_index,prompt``) is refused with a pointer to ``interactive_prompts=``."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if set(REFERENCE_COLUMNS) <= set(header) and "time" not in header:
        raise ValueError(
            f"timed_prompts={path} is the reference code's interactive CSV (id,prompt_index,prompt): give it "
            "as interactive_prompts= (each prompt for sections_per_prompt sections)"
        )
    rows = sorted(
        (_number(path, line, "time", row["time"], float), row["prompt"])
        for line, row in _csv_rows(path, ("time", "prompt"))
    )
    if rows[0][0] > 0:
        raise ValueError(f"{path}: the first prompt must start at time 0 (the earliest is {rows[0][0]:g} s)")
    return rows


def timed_sections(rows: list[tuple[float, str]], fps: int, frames_per_section: int) -> list[tuple[int, str]]:
    return [(math.floor(t * fps / frames_per_section), prompt) for t, prompt in rows]


def read_interactive_prompts(path: str, sections_per_prompt: int) -> list[tuple[str, list[tuple[int, str]]]]:
    """The reference code's interactive prompt CSV (``id,prompt_index,prompt``, optional
    ``refined_prompt``): one video per id, its prompts in ``prompt_index`` order, prompt j from section
    j x ``sections_per_prompt`` on."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for line, row in _csv_rows(path, REFERENCE_COLUMNS):
        text = (row.get("refined_prompt") or "").strip() or row["prompt"]
        index = _number(path, line, "prompt_index", row["prompt_index"], int)
        groups.setdefault(row["id"], []).append((index, text))
    return [
        (vid, [(j * sections_per_prompt, text) for j, (_, text) in enumerate(sorted(rows))])
        for vid, rows in groups.items()
    ]


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line."""
    lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    if not lines:
        raise ValueError(f"prompts_file={path}: no prompts (one per line)")
    return lines


def _load_pixels(path: str, height: int, width: int, frames: int | None) -> torch.Tensor:

    if frames is None:  # an image
        import numpy as np
        from PIL import Image

        img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).unsqueeze(0)
        return resize_center_crop(img, height, width).unsqueeze(0)
    clip, _ = decode_clip(path, frames, height, width)
    return clip.unsqueeze(0)


def run(cfg: GenerateConfig) -> list[Path]:

    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = (
        torch.bfloat16
        if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
        else torch.float32
    )
    # the prompts are read (and a bad file refused) before the model loads
    timed = read_timed_prompts(cfg.timed_prompts) if cfg.timed_prompts else None
    base = Path(cfg.output)
    if cfg.interactive_prompts:
        jobs = [
            (base.with_name(f"{base.stem}_{vid}{base.suffix}"), prompts)
            for vid, prompts in read_interactive_prompts(cfg.interactive_prompts, cfg.sections_per_prompt)
        ]
    elif cfg.prompts_file:
        lines = read_prompts_file(cfg.prompts_file)
        jobs = [(base.with_name(f"{base.stem}_{i:03d}{base.suffix}"), [(0, p)]) for i, p in enumerate(lines)]
    else:
        jobs = [(base, [(0, cfg.prompt)])]
    if cfg.progress:
        print(f"loading {cfg.checkpoint} on {device} ({dtype})", file=sys.stderr, flush=True)
    model = load_for_inference(cfg.checkpoint, device, dtype)
    check_decode(cfg.decode, model.latent_format, cfg.checkpoint)
    height = cfg.height or (model.size[0] if model.size else 384)
    width = cfg.width or (model.size[1] if model.size else 640)
    sampler = cfg.sampler
    first_frames, frames_per_section = section_frames(model.layout.window, model.latent_format)
    if timed is not None:
        jobs = [(base, timed_sections(timed, cfg.fps, frames_per_section))]
    if len(jobs) == 1:
        jobs = [(base, jobs[0][1])]
    image = _load_pixels(cfg.image, height, width, None) if cfg.image else None
    video = None
    if cfg.video:
        if model.latent_format == "sections":  # whole sections covering the history buffer
            cond_frames = -(-model.layout.num_history // model.layout.window) * first_frames
        else:
            cond_frames = video_frames_for(model.layout.num_history)
        video = _load_pixels(cfg.video, height, width, cond_frames)
    outputs = []
    for out, prompts in jobs:
        num_frames = cfg.num_frames
        if cfg.interactive_prompts:  # as the reference: long enough for each prompt's sections
            sections = prompts[-1][0] + cfg.sections_per_prompt
            num_frames = max(num_frames, first_frames + (sections - 1) * frames_per_section)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        result = model.generate(
            sampler,
            prompts,
            num_frames,
            generator,
            (height, width),
            image=image,
            video=video,
            adaptive_seed=cfg.seed,
            progress=functools.partial(_print_progress, out.name) if cfg.progress else None,
        )
        stats = {**result.stats, "prompts": prompts, "seed": cfg.seed, "height": height, "width": width}
        save_video(result.frames[0], out, cfg.fps, stats)
        log.info("wrote %s (%d frames) and %s", out, result.frames.shape[2], out.with_suffix(".json"))
        outputs.append(out)
    return outputs


def _print_progress(name: str, progress) -> None:
    print(f"{name}: {progress.line()}", file=sys.stderr, flush=True)


def check_decode(decode: str, latent_format: str, checkpoint: str) -> None:
    """``decode=sections|stream`` must be what the model's latent format requires."""
    needed = DECODE_MODES[latent_format]
    if decode not in ("auto", needed):
        what = {
            "sections": "the section latent format (each section encoded on its own, its first latent a "
            "single frame: streaming would decode that latent as 4 frames)",
            "clip": "whole-clip latents (decoding each section on its own would restart the VAE's causal "
            "cache at every section: seams)",
        }[latent_format]
        raise ValueError(
            f"decode={decode}: {checkpoint} was trained on {what}; it decodes with decode={needed} "
            "(or decode=auto)"
        )
