"""Data schema: synthetic videos, latent shards and their formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.config.schema.base import Validated, check, choice


@dataclass
class SyntheticConfig(Validated):
    """Moving-shapes videos with captions, written as real mp4 files and encoded like user data. Clip i
    shows scene i of a seeded order of the world's 96 (colour, shape, direction, background), cycling:
    96 clips or more cover every caption, fewer are all different."""

    num_videos: int = 8
    height: int = 64
    width: int = 64
    fps: int = 8
    seed: int = 1234
    # clip length in sections of history.window latent frames; null: just long enough for one full
    # history (ceil(history / window) + 1 sections; whole-clip latents: history + window + 2)
    sections: int | None = None
    # the shape's radius range, a share of the frame's shorter side: at least 3 latent pixels across
    # (8x VAE), the shape an object of the latent grid rather than a sub-pixel blob; at most a quarter, so
    # that the background between a shape and its wrap-around is about as wide as the shape and its motion
    # reads one way (helios/world/shapes.py keeps the tiny VAE's training range, 0.12-0.22)
    radius: list[float] = field(default_factory=lambda: [0.1875, 0.25])

    def _validate(self, prefix: str) -> None:
        check(self.num_videos >= 1, prefix + "num_videos", "must be >= 1")
        check(
            len(self.radius) == 2 and 0.0 < self.radius[0] <= self.radius[1] <= 0.5,
            prefix + "radius",
            f"needs [low, high] with 0 < low <= high <= 0.5 (a share of the frame's side), got {self.radius}",
        )
        check(self.sections is None or self.sections >= 1, prefix + "sections", "must be >= 1 (or null)")
        check(self.height % 16 == 0 and self.width % 16 == 0, prefix + "height/width", "multiples of 16")


LATENT_FORMATS = ("sections", "clip")  # see DataConfig.latent_format and ClipConfig


@dataclass
class DataConfig(Validated):
    """``synthetic``: generate + encode the tiny set into ``cache_dir``; ``latents``: read shards
    written by ``helios.prepare`` from ``path``."""

    kind: str = "synthetic"
    path: str | None = None
    # Where data=synthetic builds its set; "" = $HELIOS_CACHE/synthetic or ~/.cache/helios/synthetic.
    cache_dir: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shuffle: bool = True
    # a sample whose bytes fail their checksum: "raise" (naming shard and key) or "skip" (another sample
    # of its shape takes its place; counted as data_skipped in metrics.jsonl)
    on_error: str = "raise"
    # the latent format the model trains on (and samples / exports with): "sections" (the released
    # checkpoints': section-aligned windows of independently encoded sections, section 0 a target,
    # history zero-padded before the video start, per-section decoding) or "clip" (whole-clip latents,
    # the window at a random start, streaming decode). Shards must have been prepared in this format.
    latent_format: str = "sections"
    # the share of training samples whose prompt embeddings are zeroed (the reference's "NULL text",
    # caption_dropout_p, 0 in every released phase): trains the unconditional branch CFG samples against
    caption_dropout: float = 0.0

    def _validate(self, prefix: str) -> None:
        choice(self.kind, ("synthetic", "latents"), prefix + "kind")
        check(0.0 <= self.caption_dropout < 1.0, prefix + "caption_dropout", "a probability in [0, 1)")
        choice(self.latent_format, LATENT_FORMATS, prefix + "latent_format")
        choice(self.on_error, ("raise", "skip"), prefix + "on_error")
        if self.kind == "latents":
            check(bool(self.path), prefix + "path", "data=latents needs data.path=<shard directory>")
