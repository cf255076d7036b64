"""Objective schema: flow matching and its timestep law, the pyramid stages (§3.3.2) and
Adversarial Hierarchical Distillation (§3.4.2: DMD, GAN heads, EMA, offload)."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.config.schema.base import Validated, check, choice


@dataclass
class ShiftConfig(Validated):
    """Dynamic shifting by sequence length: mu = base_shift + (seq - base_seq_len) * slope,
    linear s = mu, exponential s = exp(min(mu, ln(exp_cap))); sigma' = s*sigma / (1 + (s-1)*sigma)."""

    enabled: bool = True
    type: str = "exponential"
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    exp_cap: float = 7.0

    def _validate(self, prefix: str) -> None:
        choice(self.type, ("linear", "exponential"), prefix + "type")
        check(self.max_seq_len > self.base_seq_len, prefix + "max_seq_len", "must exceed base_seq_len")
        check(self.exp_cap > 1.0, prefix + "exp_cap", "must be > 1")


@dataclass
class FlowConfig(Validated):
    """Flow matching with v-prediction (target = noise - x0)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    def _validate(self, prefix: str) -> None:
        choice(self.timestep_sampling, ("uniform", "logit_normal"), prefix + "timestep_sampling")
        check(self.logit_std > 0, prefix + "logit_std", "must be > 0")


@dataclass
class PyramidConfig(Validated):
    """Stage 2 (§3.3.2): ``stages`` resolutions (halved below full), in the proportions ``stage_ratios``
    (Table 1 reference: [1, 2, 1] init, [1, 1, 1] post). ``stage_draw``: "every" (the reference code) trains
    every clip at every stage k, ``stage_ratios[k]`` times (whole numbers; each time its own sigma, the
    clip's noise shared), so a clip is ``sum(stage_ratios)`` stage-samples and the global batch counts
    those; "random" (Eq. 7's expectation over k) trains each clip at one stage drawn with probability
    ``stage_ratios[k] / sum``."""

    stages: int = 3
    stage_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    stage_draw: str = "every"
    gamma: float = 1.0 / 3.0

    def samples_per_clip(self) -> int:
        """Stage-samples each clip of a micro-batch makes."""
        return round(sum(self.stage_ratios)) if self.stage_draw == "every" else 1

    def _validate(self, prefix: str) -> None:
        check(self.stages >= 1, prefix + "stages", "must be >= 1")
        check(len(self.stage_ratios) == self.stages, prefix + "stage_ratios", f"needs {self.stages} entries")
        check(
            all(r >= 0 for r in self.stage_ratios) and sum(self.stage_ratios) > 0,
            prefix + "stage_ratios",
            "must be >= 0 with a positive sum",
        )
        choice(self.stage_draw, ("every", "random"), prefix + "stage_draw")
        check(
            self.stage_draw == "random" or all(float(r).is_integer() for r in self.stage_ratios),
            prefix + "stage_ratios",
            "must be whole numbers with stage_draw=every (each is how often a clip trains that stage)",
        )
        check(0.0 < self.gamma <= 1.0 / 3.0, prefix + "gamma", "must be in (0, 1/3]")


@dataclass
class GanConfig(Validated):
    """Adversarial Post-Training (§3.4.2, Table 2): heads on the fake score's layers. Defaults are the
    reference code's (which trained Helios-Distilled): heads on blocks 5/15/25/35 plus one on the model's
    output, R1 added outside w_d; the paper's reading of Table 2 / Eq. 13+16 is
    ``layers=[5,15,25,35,39] output_head=false r1_weighting=paper``."""

    enabled: bool = True
    start_step: int = 1000
    layers: list[int] = field(default_factory=lambda: [5, 15, 25, 35])
    output_head: bool = True
    dim: int = 768
    w_g: float = 5e-2
    w_d: float = 1e-2
    r1_lambda: float = 100.0
    r1_sigma: float = 0.1
    # reference: critic += w_d * L_D + r1_lambda * R1; paper (Eq. 13 inside Eq. 16): w_d * (L_D + lambda R1)
    r1_weighting: str = "reference"
    crop: float = 0.5

    def _validate(self, prefix: str) -> None:
        check(self.start_step >= 0, prefix + "start_step", "must be >= 0")
        choice(self.r1_weighting, ("reference", "paper"), prefix + "r1_weighting")
        check(bool(self.layers) or self.output_head, prefix + "layers", "no head: give layers or output_head")
        check(0.0 < self.crop <= 1.0, prefix + "crop", "must be in (0, 1]")


@dataclass
class DistillConfig(Validated):
    """Stage 3 (§3.4, Table 2). ``phase=ode``: Staged ODE Init on ODE pairs; ``phase=post``: DMD +
    GAN with real score (frozen teacher), fake score (LoRA) and the few-step generator (LoRA)."""

    phase: str = "post"
    teacher: str | None = None  # Helios-Base: real/fake score base (run dir, checkpoint, diffusers dir)
    generator_init: str | None = None  # Helios-Mid: the generator's base (default: the teacher)
    ode_pairs: str | None = None  # shards from helios.ode_pairs (phase=ode)
    steps: list[int] = field(default_factory=lambda: [2, 2, 2])
    # the real score's CFG, x0_u + real_cfg (x0_c - x0_u): 4.0 is how the released Helios-Distilled was
    # trained (the reference's real_guidance_scale 3.0 computes x0_c + 3 (x0_c - x0_u): standard CFG 4);
    # Table 2's "real CFG 3.0" read as standard CFG: real_cfg=3
    real_cfg: float = 4.0
    ttur: int = 5
    fake_lr: float = 4e-7
    fake_lora_rank: int = 256
    fake_lora_alpha: int = 256
    renoise_a0: float = 4.0
    renoise_b0: float = 1.5
    renoise_anneal_steps: int = 500
    ema_decay: float = 0.99
    ema_start: int = 750
    # §4.2 sharded EMA: each rank keeps 1/world of the fp32 EMA (gathered to save); false: full copies
    ema_sharded: bool = True
    ode_weight: float = 40.0  # reference: 0.5 * MSE * 80
    # §4.2 Cache Grad for GAN: the generator's GAN gradient is taken w.r.t. the discriminator's input
    # right away (its activations freed) and injected into the generator's backward; same gradients.
    cache_gan_grad: bool = True
    # the critic's loss backpropagated in two parts, flow matching then GAN D + R1, the first graph freed
    # before the second's forwards (the same gradients; DDP and single process; a ZeRO engine takes one
    # backward per micro-batch, so it stays joint there); joint: one backward of the sum
    critic_backward: str = "parts"
    # the real and fake scores share one frozen teacher base, the real score running it with the critic's
    # adapters off (the reference code: three 14B bases -> two); false: the real score is a separate frozen
    # copy (the paper's four 14B models; the same outputs, one more base in memory)
    shared_teacher: bool = True
    # §4.2 async VRAM offload (parallel=ddp): frozen role weights in pinned host memory, only the bases
    # the current point of the step needs resident (one with the shared teacher and cached GAN gradients);
    # the paper's layout at 8 x 80 GB also offloads activations (model.transformer.checkpoint_offload=true)
    offload: bool = False
    # with offload: the next role's base copied on a side stream while the current one computes (the
    # copy hidden, one more 14B base on the GPU: for GPUs with room for it, e.g. 141 GB)
    offload_prefetch: bool = False
    # Table-5 ablations: "w Self-Forcing" (history = the generator's own rollout instead of real data) and
    # "w Bidirectional Teacher" (the real score sees a bidirectional_frames-long segment, no history inputs)
    history_source: str = "teacher"
    real_score: str = "history"
    # the real score's unconditional branch: "negative" = the negative prompt helios.prepare encoded (the
    # reference); "empty" = the empty prompt's encoding (the paper's plain CFG); "zeros" = zero embeddings,
    # what caption dropout trains the branch on (the teacher's sampler.negative_prompt=null)
    uncond: str = "negative"
    bidirectional_frames: int = 21
    gan: GanConfig = field(default_factory=GanConfig)

    def _validate(self, prefix: str) -> None:
        choice(self.phase, ("ode", "post"), prefix + "phase")
        choice(self.history_source, ("teacher", "self_forcing"), prefix + "history_source")
        choice(self.critic_backward, ("parts", "joint"), prefix + "critic_backward")
        choice(self.real_score, ("history", "bidirectional"), prefix + "real_score")
        choice(self.uncond, ("negative", "empty", "zeros"), prefix + "uncond")
        check(self.ttur >= 1, prefix + "ttur", "must be >= 1")
        check(
            len(self.steps) >= 1 and all(s >= 1 for s in self.steps), prefix + "steps", "positive per stage"
        )
        check(0.0 < self.ema_decay < 1.0, prefix + "ema_decay", "must be in (0, 1)")
