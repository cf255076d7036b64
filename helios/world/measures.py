"""Ground-truth measures of the moving-shapes world (helios/world/shapes.py): how well a video matches
its caption, computed the same way for generated and for real clips (the reference values).

Every pixel is labelled with its nearest palette colour (the shape colours and backgrounds the renderer
uses). Per video, from the caption ("a red circle moving right on a blue background"):

- ``palette_error``: mean RGB distance (0-1 scale) of each pixel to its nearest palette colour: how
  clean the frames are (coloured noise ~0.2, real clips ~0);
- ``background_match``: fraction of pixels labelled as the caption's background;
- ``shape_colour_match``: fraction of the non-background pixels labelled as the caption's colour;
- ``objects``: mean number of connected foreground blobs (4-neighbourhood, at least ``min_area``
  pixels) per frame; 1 for real clips;
- ``motion_along``: mean per-frame displacement (pixels) of the foreground centroid along the caption's
  direction (real clips: 1-3, the renderer's speed), frames where the shape wraps around the border
  left out; ``motion_jitter``: its standard deviation (smoothness).

These are simple, documented statistics, not perceptual scores: they tell moving shapes from noise, a
right colour from a wrong one, and a moving object from a frozen or jittering one.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

from helios.world.shapes import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES

PALETTE_NAMES = [*(f"fg:{c}" for c in COLORS), *(f"bg:{c}" for c in BACKGROUNDS)]
PALETTE = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()], dtype=torch.float32) / 255.0
CAPTION = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str
    background: str


def parse_caption(caption: str) -> Scene:
    """The scene a synthetic caption describes; ValueError for any other text."""
    m = CAPTION.fullmatch(caption.strip())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in DIRECTIONS or m[4] not in BACKGROUNDS:
        raise ValueError(f"not a moving-shapes caption: {caption!r}")
    return Scene(m[1], m[2], m[3], m[4])


def palette_labels(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, T, H, W] in [-1, 1] -> (label [T, H, W] indexing :data:`PALETTE`, distance [T, H, W])."""
    rgb = ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # [T, H, W, 3]
    dist = torch.cdist(rgb.reshape(-1, 3), PALETTE)  # [N, P]
    d, label = dist.min(dim=1)
    return label.view(rgb.shape[:3]), d.view(rgb.shape[:3])


def count_blobs(mask: torch.Tensor, min_area: int) -> int:
    """Connected components (4-neighbourhood) of a [H, W] boolean mask with at least ``min_area`` pixels,
    the image treated as a torus (the renderer wraps shapes around the borders)."""
    h, w = mask.shape
    cells = mask.tolist()
    visited = [[False] * w for _ in range(h)]
    count = 0
    for y0 in range(h):
        for x0 in range(w):
            if not cells[y0][x0] or visited[y0][x0]:
                continue
            stack, area = [(y0, x0)], 0
            visited[y0][x0] = True
            while stack:
                y, x = stack.pop()
                area += 1
                for ny, nx in ((y - 1) % h, x), ((y + 1) % h, x), (y, (x - 1) % w), (y, (x + 1) % w):
                    if cells[ny][nx] and not visited[ny][nx]:
                        visited[ny][nx] = True
                        stack.append((ny, nx))
            count += area >= min_area
    return count


def _centroid(mask: torch.Tensor) -> tuple[float, float] | None:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return float(xs.float().mean()), float(ys.float().mean())


def video_metrics(video: torch.Tensor, caption: str, min_area: int = 4) -> dict[str, float]:
    """The measures of the module docstring for one video [3, T, H, W] in [-1, 1] and its caption."""
    scene = parse_caption(caption)
    label, dist = palette_labels(video)
    bg = PALETTE_NAMES.index(f"bg:{scene.background}")
    fg = PALETTE_NAMES.index(f"fg:{scene.colour}")
    foreground = label != bg
    n_fg = int(foreground.sum())
    _, t, h, w = video.shape
    objects = [count_blobs(foreground[i], min_area) for i in range(t)]
    dx, dy = DIRECTIONS[scene.direction]
    steps = []
    centroids = [_centroid(foreground[i]) for i in range(t)]
    for a, b in itertools.pairwise(centroids):
        if a is None or b is None:
            continue
        along = (b[0] - a[0]) * dx + (b[1] - a[1]) * dy
        if abs(along) < min(h, w) / 4:  # a wrap-around jumps by about the frame size: left out
            steps.append(along)
    mean = sum(steps) / len(steps) if steps else math.nan
    jitter = math.sqrt(sum((s - mean) ** 2 for s in steps) / len(steps)) if steps else math.nan
    return {
        "palette_error": float(dist.mean()),
        "background_match": float((label == bg).float().mean()),
        "shape_colour_match": float((label[foreground] == fg).float().mean()) if n_fg else 0.0,
        "objects": sum(objects) / t,
        "motion_along": mean,
        "motion_jitter": jitter,
    }


def caption_metrics(video: torch.Tensor, caption: str) -> dict[str, float]:
    """:func:`video_metrics` when ``caption`` describes a moving-shapes scene (the tiny default's validation
    prompts), else ``{}`` (a real run's prompts); undefined measures (no motion seen) left out."""
    try:
        parse_caption(caption)
    except ValueError:
        return {}
    return {k: v for k, v in video_metrics(video, caption).items() if math.isfinite(v)}


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over videos (NaNs left out)."""
    keys = rows[0].keys() if rows else []
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out
