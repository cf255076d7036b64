"""History schema (§3.1, §3.2.3): the long/mid/short layout, task formats and Frame-Aware Corrupt."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from helios.config.schema.base import Validated, check, check_range, choice


@dataclass
class TaskConfig(Validated):
    """Representation Control (§3.1.1): per-sample probabilities of each history format.

    The remaining probability ``1 - t2v - i2v - v2v_partial`` keeps the full history (V2V). The defaults
    are the released checkpoints' (the reference's nested draws: T2V 0.4, then partial V2V 0.4 of the
    rest; stage 3: 0.5). ``i2v`` trains the format the I2V sampler feeds (anchor + last history frame
    only), which the released checkpoints never saw (the reference's own correct.yaml: 0.1 of the rest,
    ``i2v=0.06 v2v_partial=0.216``).
    """

    t2v: float = 0.4
    i2v: float = 0.0
    v2v_partial: float = 0.24

    def _validate(self, prefix: str) -> None:
        for name in ("t2v", "i2v", "v2v_partial"):
            check(0.0 <= getattr(self, name) <= 1.0, prefix + name, "must be a probability in [0, 1]")
        total = self.t2v + self.i2v + self.v2v_partial
        check(total <= 1.0 + 1e-6, prefix.rstrip("."), f"t2v + i2v + v2v_partial = {total:.4f} exceeds 1")


@dataclass
class SaturationConfig(Validated):
    """The reference code's stage-3 saturation of the generator's history (``mode=reference`` only): each
    history region kept with ``p_clean``, else scaled around the per-position channel mean by a factor from
    ``[range[0], 1)`` or ``(1, range[1]]``."""

    enabled: bool = False
    p_clean: float = 0.1
    range: list[float] = field(default_factory=lambda: [0.3, 1.7])

    def _validate(self, prefix: str) -> None:
        check(0.0 <= self.p_clean <= 1.0, prefix + "p_clean", "must be a probability in [0, 1]")
        check_range(self.range, prefix + "range", 0.0, 10.0)
        check(self.range[0] < 1.0 < self.range[1], prefix + "range", "must straddle 1 (below and above)")


@dataclass
class CorruptConfig(Validated):
    """Frame-Aware Corrupt (§3.2.3; helios/core/corrupt.py).

    ``mode=reference`` (default: how the released checkpoints were trained): per micro-batch, clean with
    ``reference_p_clean``, else noise (``reference_p_noise`` of the rest; the reference's "random" mode: 0.9)
    or down-up sampling; noise level per frame from ``noise``, the anchor corrupted too; ``saturation``
    (stage 3) on the generator's history.
    ``mode=paper``: every history frame independently draws exposure (p_exposure, scale in ``exposure``),
    noise (p_noise, level in ``noise``), down-then-up sampling (p_downsample, resolution reduction in
    ``downsample``) or clean (p_clean); the four must sum to 1 (Table 1: stage-1-post 0 / 0.8 / 0.1 / 0.1).
    """

    enabled: bool = True
    mode: str = "reference"
    p_exposure: float = 0.0
    p_noise: float = 0.8
    p_downsample: float = 0.1
    p_clean: float | None = 0.1  # null: whatever the other three leave (handy in sweeps)
    reference_p_clean: float = 0.1
    reference_p_noise: float = 1.0
    exposure: list[float] = field(default_factory=lambda: [0.3, 1.7])
    noise: list[float] = field(default_factory=lambda: [0.0, 1.0 / 3.0])  # Table 1 rounds it to 0.33
    downsample: list[float] = field(default_factory=lambda: [0.0, 0.1])
    saturation: SaturationConfig = field(default_factory=SaturationConfig)

    def _validate(self, prefix: str) -> None:
        choice(self.mode, ("paper", "reference"), prefix + "mode")
        if self.p_clean is None:
            self.p_clean = round(1.0 - self.p_exposure - self.p_noise - self.p_downsample, 12)
        probs = {k: getattr(self, k) for k in ("p_exposure", "p_noise", "p_downsample", "p_clean")}
        for k, v in probs.items():
            check(0.0 <= v <= 1.0, prefix + k, f"must be a probability in [0, 1], got {v}")
        total = sum(probs.values())
        check(
            math.isclose(total, 1.0, abs_tol=1e-6),
            prefix + "p_*",
            f"p_exposure + p_noise + p_downsample + p_clean must sum to 1, got {total:.6f} ({probs})",
        )
        for k in ("reference_p_clean", "reference_p_noise"):
            check(0.0 <= getattr(self, k) <= 1.0, prefix + k, "must be a probability in [0, 1]")
        check_range(self.exposure, prefix + "exposure", 0.0, 10.0)
        check_range(self.noise, prefix + "noise", 0.0, 1.0)
        check_range(self.downsample, prefix + "downsample", 0.0, 0.95)
        self.saturation.validate(prefix + "saturation.")


@dataclass
class HistoryConfig(Validated):
    """History layout (§3.1, §3.3.1): ``sizes`` = [long, mid, short] latent frames, ``window`` =
    noisy latent frames per section, first-frame ``anchor`` (§3.2.2), ``relative_rope`` (§3.2.1)."""

    sizes: list[int] = field(default_factory=lambda: [16, 2, 1])
    window: int = 9
    anchor: bool = True
    relative_rope: bool = True
    multi_term_patch: bool = True
    tasks: TaskConfig = field(default_factory=TaskConfig)
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)

    def _validate(self, prefix: str) -> None:
        check(len(self.sizes) == 3, prefix + "sizes", "needs [long, mid, short] latent frame counts")
        check(all(s >= 1 for s in self.sizes), prefix + "sizes", f"entries must be >= 1, got {self.sizes}")
        check(self.window >= 1, prefix + "window", "must be >= 1")
