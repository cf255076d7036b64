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
- ``motion_along``: mean per-frame displacement (pixels) of the foreground's centre on the torus along the
  caption's direction (real clips: 1-3, the renderer's speed); ``motion_jitter``: its standard deviation
  (smoothness).

These are simple, documented statistics, not perceptual scores: they tell moving shapes from noise, a
right colour from a wrong one, and a moving object from a frozen or jittering one.

A long video is measured section by section (:func:`section_measures`, what drifting looks like for an
object, §3.2.3) on the pixels of the caption's colour: ``present`` (share of the section's frames where
the shape is there: at least ``PRESENT_PIXELS`` of them), ``colour`` (share of the non-background pixels
in the caption's colour), ``advance`` (pixels the shape's centre moved along the caption's direction over
the section, frame to frame on the torus the renderer draws on) and ``position`` (that centre along the
caption's direction at the section's end, a fraction of the frame: its trend over the sections is the
long-range motion) and ``form`` (share of the frames with the shape whose form is the caption's: circle or
square, :func:`form_score`). :func:`long_video_summary` reduces them to what a long video is judged by.
"""

from __future__ import annotations

import itertools
import math
import re

import torch

from helios.world.shapes import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, Scene

PALETTE_NAMES = [*(f"fg:{c}" for c in COLORS), *(f"bg:{c}" for c in BACKGROUNDS)]
PALETTE = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()], dtype=torch.float32) / 255.0
CAPTION = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")


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


PRESENT_PIXELS = 16  # 1/256 of a 64 x 64 frame; the smallest shape the renderer draws covers ~150


def torus_centre(mask: torch.Tensor) -> tuple[float, float] | None:
    """(x, y) centre of a [H, W] mask on the torus (circular mean per axis: a shape split across a border
    has its centre at the border, not mid-frame); None for an empty mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    h, w = mask.shape

    def circular(v: torch.Tensor, n: int) -> float:
        angle = v.double() * (2 * math.pi / n)
        return (math.atan2(float(angle.sin().mean()), float(angle.cos().mean())) * n / (2 * math.pi)) % n

    return circular(xs, w), circular(ys, h)


def form_score(mask: torch.Tensor, centre: tuple[float, float]) -> float:
    """How square (> 0) or round (< 0) a non-empty [H, W] mask is: its IoU with the axis-aligned square of
    its area centred at ``centre`` (on the torus) less its IoU with the circle of its area there. Rendered
    circles score -0.19 to -0.14, squares 0.15 to 0.17; through the tiny VAE, whose decoder rounds a small
    square's corners, about 1 frame in 20 lands on the wrong side (docs/tiny-world.md)."""
    h, w = mask.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    ox = (xs - centre[0] + w / 2) % w - w / 2
    oy = (ys - centre[1] + h / 2) % h - h / 2
    area = float(mask.sum())
    half, radius = math.sqrt(area) / 2, math.sqrt(area / math.pi)
    square = (ox.abs() <= half) & (oy.abs() <= half)
    circle = ox**2 + oy**2 <= radius**2

    def iou(template: torch.Tensor) -> float:
        return float((mask & template).sum()) / float((mask | template).sum())

    return iou(square) - iou(circle)


def torus_step(a: float, b: float, n: int) -> float:
    """The shortest signed move from ``a`` to ``b`` on a circle of ``n`` pixels."""
    return (b - a + n / 2) % n - n / 2


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
    centres = [torus_centre(foreground[i]) for i in range(t)]
    steps = [
        torus_step(a[0], b[0], w) * dx + torus_step(a[1], b[1], h) * dy
        for a, b in itertools.pairwise(centres)
        if a is not None and b is not None
    ]
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


def section_measures(
    video: torch.Tensor, caption: str, first_frames: int, frames: int
) -> list[dict[str, float]]:
    """Per section of a [3, T, H, W] video in [-1, 1] (the first section ``first_frames`` frames, every
    later one ``frames``): the module docstring's ``present``, ``colour``, ``advance``, ``position``,
    ``form`` (NaN where the section never shows the shape) and ``seam_step``, the centre's move along the
    caption from the previous section's last frame to this section's first (NaN for the first section or
    where the shape is missing at the seam)."""
    scene = parse_caption(caption)
    label, _ = palette_labels(video)
    fg = label == PALETTE_NAMES.index(f"fg:{scene.colour}")
    foreground = label != PALETTE_NAMES.index(f"bg:{scene.background}")
    t, h, w = label.shape
    dx, dy = DIRECTIONS[scene.direction]
    size = w if dx else h
    centres = [torus_centre(fg[i]) if int(fg[i].sum()) >= PRESENT_PIXELS else None for i in range(t)]
    sign = 1.0 if scene.shape == "square" else -1.0
    form = [c is not None and sign * form_score(fg[i], c) > 0 for i, c in enumerate(centres)]

    def along(i: int) -> float:  # the move from frame i - 1 to frame i
        p, q = centres[i - 1], centres[i]
        if p is None or q is None:
            return math.nan
        return torus_step(p[0], q[0], w) * dx + torus_step(p[1], q[1], h) * dy

    bounds = [0, *range(first_frames, t, frames), t]
    rows = []
    for a, b in itertools.pairwise(bounds):
        last = next((c for c in reversed(centres[a:b]) if c is not None), None)
        n_fg, seen = int(foreground[a:b].sum()), sum(c is not None for c in centres[a:b])
        rows.append(
            {
                "present": seen / (b - a),
                "colour": float((fg[a:b] & foreground[a:b]).sum()) / n_fg if n_fg else 0.0,
                "advance": float(sum(x for i in range(a + 1, b) if math.isfinite(x := along(i)))),
                "position": (last[0] * dx + last[1] * dy) % size / size if last else math.nan,
                "seam_step": along(a) if a else math.nan,
                "form": sum(form[a:b]) / seen if seen else math.nan,
            }
        )
    return rows


def long_video_summary(sections: list[dict[str, float]]) -> dict[str, float]:
    """A long video's verdict from :func:`section_measures`: the worst section's ``present`` and
    ``colour``, the whole video's ``advance`` (pixels along the caption, seams included), the share of
    sections that advance the caption's way, ``moves_along`` (1.0 when the video as a whole does) and
    ``mean_form`` (the sections' ``form``, averaged over those that show the shape; NaN if none does)."""
    seams = [s["seam_step"] for s in sections if math.isfinite(s["seam_step"])]
    advance = sum(s["advance"] for s in sections) + sum(seams)
    forms = [s["form"] for s in sections if math.isfinite(s["form"])]
    return {
        "mean_form": sum(forms) / len(forms) if forms else math.nan,
        "min_present": min(s["present"] for s in sections),
        "min_colour": min(s["colour"] for s in sections),
        "advance": advance,
        "sections_advancing": sum(s["advance"] > 0 for s in sections) / len(sections),
        "moves_along": float(advance > 0),
    }


def caption_metrics(video: torch.Tensor, caption: str) -> dict[str, float]:
    """:func:`video_metrics` when ``caption`` describes a moving-shapes scene (the tiny default's validation
    prompts), else ``{}`` (a real run's prompts); undefined measures (no motion seen) left out."""
    try:
        parse_caption(caption)
    except ValueError:
        return {}
    return {k: v for k, v in video_metrics(video, caption).items() if math.isfinite(v)}


def caption_section_metrics(
    video: torch.Tensor, caption: str, first_frames: int, frames: int
) -> dict[str, float]:
    """Flat per-section measures (``section<k>_<measure>``, k from 0) and the summary (``long_<key>``) of a
    moving-shapes video, for a dashboard; ``{}`` for a caption of another world; NaNs left out."""
    try:
        parse_caption(caption)
    except ValueError:
        return {}
    rows = section_measures(video, caption, first_frames, frames)
    flat = {f"section{k}_{key}": v for k, row in enumerate(rows) for key, v in row.items()}
    flat.update({f"long_{key}": v for key, v in long_video_summary(rows).items()})
    return {k: v for k, v in flat.items() if math.isfinite(v)}


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over videos (NaNs left out)."""
    keys = rows[0].keys() if rows else []
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out
