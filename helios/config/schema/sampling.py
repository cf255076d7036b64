"""Sampling schema: the autoregressive sampler, adaptive anti-drifting (§3.5) and validation
during training."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.config.schema.base import REFERENCE_NEGATIVE_PROMPT, Validated, check, choice


@dataclass
class AdaptiveSamplingConfig(Validated):
    """Adaptive Sampling (§3.5, Eq. 17-19): EMA of section latent mean/variance; a drifting section's
    history frames get Frame-Aware Corrupt (noise of level ``noise``) for the next section."""

    enabled: bool = False
    rho_mu: float = 0.9
    rho_sigma: float = 0.9
    delta_mu: float = 0.15
    delta_sigma: float = 0.15
    noise: float = 0.1

    def _validate(self, prefix: str) -> None:
        for k in ("rho_mu", "rho_sigma"):
            check(0.0 < getattr(self, k) < 1.0, prefix + k, "must be in (0, 1)")
        check(0.0 <= self.noise <= 1.0, prefix + "noise", "must be in [0, 1]")


@dataclass
class SamplerConfig(Validated):
    """Section sampler: ``unipc`` (Stage 1), ``pyramid`` (Pyramid UniPC, Stage 2), ``dmd`` (Stage 3).
    ``steps`` has one entry per pyramid stage (one for ``unipc``)."""

    kind: str = "unipc"
    steps: list[int] = field(default_factory=lambda: [50])
    guidance_scale: float = 5.0
    cfg_zero_star: bool = False
    amplify_first: bool = False
    shift_type: str = "exponential"
    # "stage": each pyramid stage shifted by its own token count (training, the reference pipeline);
    # "diffusers": by the previous stage's (diffusers' HeliosPyramidPipeline; for parity with it)
    shift_order: str = "stage"
    gamma: float = 1.0 / 3.0
    # CFG's unconditional branch: the reference's inference (infer_helios.py) and ODE pairs use Wan's negative
    # prompt, as the real score of stage 3 does; "" for the empty prompt's encoding; null for zero embeddings,
    # what caption dropout (data.caption_dropout, the reference's "Set NULL Text") trains the branch on
    negative_prompt: str | None = REFERENCE_NEGATIVE_PROMPT
    interpolation_steps: int = 1
    # the first-frame anchor from the second section's first latent frame on (the reference pipeline's
    # is_skip_first_chunk, suggested there when the first sections come out static); False: the first
    # section's (T2V) or the given image's / video's first frame for the whole video
    anchor_from_second_section: bool = False
    adaptive: AdaptiveSamplingConfig = field(default_factory=AdaptiveSamplingConfig)

    def _validate(self, prefix: str) -> None:
        choice(self.kind, ("unipc", "pyramid", "dmd"), prefix + "kind")
        check(
            all(s >= 1 for s in self.steps) and self.steps, prefix + "steps", "one positive count per stage"
        )
        if self.kind == "unipc":
            check(len(self.steps) == 1, prefix + "steps", "unipc has a single stage: steps=[N]")
        choice(self.shift_type, ("linear", "exponential"), prefix + "shift_type")
        choice(self.shift_order, ("stage", "diffusers"), prefix + "shift_order")
        check(0.0 < self.gamma <= 1.0 / 3.0, prefix + "gamma", "must be in (0, 1/3]")
        check(self.interpolation_steps >= 1, prefix + "interpolation_steps", "must be >= 1")


@dataclass
class ValidationConfig(Validated):
    """Videos on fixed prompts and seeds every ``every`` steps (0: only at the end) under
    ``samples/``, with per-section drift statistics in ``metrics.jsonl``."""

    enabled: bool = True
    every: int = 0
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right on a blue background"])
    seed: int = 0
    num_frames: int = 18
    fps: int = 8
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def _validate(self, prefix: str) -> None:
        check(self.every >= 0, prefix + "every", "must be >= 0")
        check(bool(self.prompts), prefix + "prompts", "needs at least one prompt")
        check(self.num_frames >= 1, prefix + "num_frames", "must be >= 1")
