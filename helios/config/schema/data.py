"""Data schema: synthetic videos, latent shards and their formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.config.schema.base import Validated, check, choice


@dataclass
class SyntheticConfig(Validated):
    """Moving-shapes videos with captions, written as real mp4 files and encoded like user data."""

    num_videos: int = 8
    height: int = 64
    width: int = 64
    fps: int = 8
    seed: int = 1234

    def _validate(self, prefix: str) -> None:
        check(self.num_videos >= 1, prefix + "num_videos", "must be >= 1")
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

    def _validate(self, prefix: str) -> None:
        choice(self.kind, ("synthetic", "latents"), prefix + "kind")
        choice(self.latent_format, LATENT_FORMATS, prefix + "latent_format")
        choice(self.on_error, ("raise", "skip"), prefix + "on_error")
        if self.kind == "latents":
            check(bool(self.path), prefix + "path", "data=latents needs data.path=<shard directory>")
