"""The moving-shapes world: one coloured shape moving in a straight line over a plain background on a
torus (what leaves at one border comes back at the other), with its caption. The tiny default's data
(:mod:`helios.data.synthetic` writes its clips as mp4 files), the tiny VAE's training clips, and the
reference of the world's measures (:mod:`helios.world.measures`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
# the shape's radius, a fraction of the frame's shorter side, drawn per clip from this range: the tiny
# VAE's training clips (helios/commands/tiny_vae_training.py); the tiny default's clips draw from
# data.synthetic.radius
RADIUS = (0.12, 0.22)


@dataclass(frozen=True)
class Scene:
    """What a clip shows, and so what its caption says."""

    colour: str
    shape: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every scene of the world (4 colours x 2 shapes x 4 directions x 3 backgrounds = 96), in one order."""
    return [Scene(*combo) for combo in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def _pick(options, generator: torch.Generator):
    keys = list(options)
    return keys[int(torch.randint(len(keys), (1,), generator=generator))]


def render_clip(
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scene: Scene | None = None,
    anywhere: bool = False,
    radius: tuple[float, float] = RADIUS,
) -> tuple[torch.Tensor, str]:
    """One clip as a float tensor [3, T, H, W] in [-1, 1] and its caption: of ``scene``, or of one drawn
    from ``generator``; its radius (a share of the frame's shorter side, uniform in ``radius``), speed and
    start are drawn from ``generator`` either way. The shape starts in the middle 40 % of the frame, or
    ``anywhere`` on the torus (a short clip then shows it crossing a border as often as a long one does)."""
    if scene is None:
        shape, color, bg, direction = (
            _pick(SHAPES, generator),
            _pick(COLORS, generator),
            _pick(BACKGROUNDS, generator),
            _pick(DIRECTIONS, generator),
        )
        scene = Scene(color, shape, direction, bg)
    color, shape, direction, bg = scene.colour, scene.shape, scene.direction, scene.background
    share = radius[0] + (radius[1] - radius[0]) * float(torch.rand(1, generator=generator))
    r = max(3, int(min(height, width) * share))
    speed = 1.0 + 2.0 * float(torch.rand(1, generator=generator))
    dx, dy = DIRECTIONS[direction]
    low, span = (0.0, 1.0) if anywhere else (0.3, 0.4)
    cx = width * (low + span * float(torch.rand(1, generator=generator)))
    cy = height * (low + span * float(torch.rand(1, generator=generator)))
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    frames = torch.empty(num_frames, height, width, 3)
    fg, bgc = (
        torch.tensor(COLORS[color], dtype=torch.float32),
        torch.tensor(BACKGROUNDS[bg], dtype=torch.float32),
    )
    for t in range(num_frames):
        # the frame is a torus: a shape crossing a border shows on both sides, its motion continuous
        ox = (xx - (cx + dx * speed * t) + width / 2) % width - width / 2
        oy = (yy - (cy + dy * speed * t) + height / 2) % height - height / 2
        if shape == "circle":
            mask = ox**2 + oy**2 <= r**2
        else:
            mask = (ox.abs() <= r) & (oy.abs() <= r)
        frames[t] = torch.where(mask[..., None], fg, bgc)
    return frames.permute(3, 0, 1, 2) / 127.5 - 1.0, scene.caption
