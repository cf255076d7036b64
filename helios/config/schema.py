"""Typed configuration schema.

Every Hydra YAML file under ``configs/`` is merged into :class:`TrainConfig` before anything is
built: unknown keys, wrong types and out-of-range values stop the run at start-up with the key
path in the message (:class:`ConfigError`). Each dataclass validates its own fields in
``validate(prefix)``; cross-field rules live in :meth:`TrainConfig.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING

# The negative prompt of the reference code's training (its DataConfig.negative_prompt, Wan's): the real
# score's unconditional branch in stage 3, encoded by helios.prepare next to the empty prompt.
REFERENCE_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config error at '{key}': {reason}")
        self.key = key
        self.reason = reason


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(key, reason)


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, key, f"must be one of {list(options)}, got {value!r}")


def _range(values: list[float], key: str, lo: float, hi: float) -> None:
    _check(len(values) == 2, key, f"must be a [min, max] pair, got {values}")
    _check(lo <= values[0] <= values[1] <= hi, key, f"must satisfy {lo} <= min <= max <= {hi}, got {values}")


class Validated:
    """Mixin: validate this node, then every nested dataclass field."""

    def validate(self, prefix: str = "") -> None:
        self._validate(prefix)
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if is_dataclass(value) and isinstance(value, Validated):
                value.validate(f"{prefix}{f.name}.")

    def _validate(self, prefix: str) -> None:  # overridden where a node has rules
        return None


# --------------------------------------------------------------------------- model


@dataclass
class TransformerConfig(Validated):
    """`HeliosTransformer3DModel` construction (diffusers is the model definition).

    ``source``: ``random`` (seeded init from the shape fields below), ``helios`` (a diffusers
    Helios checkpoint at ``path``) or ``wan`` (a diffusers Wan-2.1 T2V checkpoint at ``path``,
    converted on load, see :mod:`helios.model.wan_init`).
    """

    source: str = "random"
    path: str | None = None
    subfolder: str | None = None
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    rope_dim: list[int] = field(default_factory=lambda: [44, 42, 42])
    rope_theta: float = 10000.0
    # Guidance Attention (§3.1.2)
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"
    # Ablation "w Guidance Attention*" (Table 5): history queries do not see noisy keys.
    history_causal_mask: bool = False
    # How the multi-term memory patch convs are initialised from the patch embedding (Wan init).
    memory_patch_init: str = "average"
    init_seed: int = 0
    gradient_checkpointing: bool = False

    def _validate(self, prefix: str) -> None:
        _choice(self.source, ("random", "helios", "wan"), prefix + "source")
        if self.source != "random":
            _check(bool(self.path), prefix + "path", f"source={self.source!r} needs a checkpoint directory")
        _check(len(self.rope_dim) == 3, prefix + "rope_dim", "needs three entries (t, h, w)")
        _check(
            sum(self.rope_dim) == self.attention_head_dim,
            prefix + "rope_dim",
            f"must sum to attention_head_dim={self.attention_head_dim}, got {sum(self.rope_dim)}",
        )
        _check(all(d % 2 == 0 for d in self.rope_dim), prefix + "rope_dim", "entries must be even")
        for name in ("num_attention_heads", "attention_head_dim", "text_dim", "ffn_dim", "num_layers"):
            _check(getattr(self, name) > 0, prefix + name, "must be > 0")
        _choice(self.history_scale_mode, ("per_head", "scalar"), prefix + "history_scale_mode")
        _choice(self.memory_patch_init, ("average", "copy_center", "zero"), prefix + "memory_patch_init")


@dataclass
class LoraConfig(Validated):
    """LoRA through peft (Table 1: rank = alpha)."""

    enabled: bool = True
    rank: int = 128
    alpha: int = 128
    dropout: float = 0.0
    # "all-linear": every nn.Linear whose name has no "norm" (embedders, adaLN projection, proj_out, the
    # blocks) plus the patch embedding, as the reference code that trained the released weights;
    # "blocks": only the linears inside the DiT blocks; or a list of module-name suffixes.
    targets: Any = "all-linear"
    # How the multi-term memory patch convs (patch_short/mid/long) train: full | lora | frozen.
    memory_patch: str = "full"
    # Also train these parameters in full (name substrings), e.g. [history_key_scale].
    extra_trainable: list[str] = field(default_factory=lambda: ["history_key_scale"])

    def _validate(self, prefix: str) -> None:
        _check(self.rank > 0, prefix + "rank", "must be > 0")
        _check(self.alpha > 0, prefix + "alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, prefix + "dropout", "must be in [0, 1)")
        _check(
            self.targets in ("all-linear", "blocks")
            or (isinstance(self.targets, list | tuple) and all(isinstance(t, str) for t in self.targets)),
            prefix + "targets",
            "must be 'all-linear', 'blocks' or a list of module-name suffixes",
        )
        _choice(self.memory_patch, ("full", "lora", "frozen"), prefix + "memory_patch")


TINY_VAE_BASE_DIM = 8  # the shipped trained tiny VAE (helios/assets/tiny_vae)


@dataclass
class VaeConfig(Validated):
    """`AutoencoderKLWan`: ``tiny`` a small one (``tiny_weights=trained``: the shipped VAE trained on the
    moving-shapes world, helios/commands/tiny_vae.py; ``random``: seeded init); ``pretrained`` loads
    ``path``."""

    source: str = "pretrained"
    path: str | None = None
    subfolder: str | None = "vae"
    tiny_weights: str = "trained"
    base_dim: int = 8
    init_seed: int = 0

    def _validate(self, prefix: str) -> None:
        _choice(self.source, ("tiny", "pretrained"), prefix + "source")
        _choice(self.tiny_weights, ("trained", "random"), prefix + "tiny_weights")
        if self.source == "tiny" and self.tiny_weights == "trained":
            _check(
                self.base_dim == TINY_VAE_BASE_DIM,
                prefix + "base_dim",
                f"the shipped trained tiny VAE has base_dim {TINY_VAE_BASE_DIM}; other widths need "
                "model.vae.tiny_weights=random (or train one: python -m helios.tiny_vae)",
            )
        if self.source == "pretrained":
            _check(bool(self.path), prefix + "path", "source='pretrained' needs a model directory")


@dataclass
class TextEncoderConfig(Validated):
    """UMT5 encoder + tokenizer: ``tiny`` (byte tokenizer, small seeded UMT5) or ``pretrained``."""

    source: str = "pretrained"
    path: str | None = None
    subfolder: str | None = "text_encoder"
    tokenizer_subfolder: str | None = "tokenizer"
    max_sequence_length: int = 512
    d_model: int = 32
    num_layers: int = 2
    init_seed: int = 0

    def _validate(self, prefix: str) -> None:
        _choice(self.source, ("tiny", "pretrained"), prefix + "source")
        if self.source == "pretrained":
            _check(bool(self.path), prefix + "path", "source='pretrained' needs a model directory")
        _check(self.max_sequence_length > 0, prefix + "max_sequence_length", "must be > 0")


@dataclass
class KernelsConfig(Validated):
    """Fused Triton kernels (§4.3) patched into the diffusers model: ``triton`` or eager ``torch``."""

    norm: str = "torch"
    rope: str = "torch"

    def _validate(self, prefix: str) -> None:
        _choice(self.norm, ("torch", "triton"), prefix + "norm")
        _choice(self.rope, ("torch", "triton"), prefix + "rope")


@dataclass
class ModelConfig(Validated):
    name: str = "tiny"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    # attention backend: sdpa (torch), flash (flash-attn 2), flash3 (Hopper); SDPA where unavailable
    attention: str = "sdpa"
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def _validate(self, prefix: str) -> None:
        _choice(self.attention, ("sdpa", "flash", "flash3"), prefix + "attention")


# --------------------------------------------------------------------------- history


@dataclass
class TaskConfig(Validated):
    """Representation Control (§3.1.1): per-sample probabilities of each history format.

    The remaining probability ``1 - t2v - i2v - v2v_partial`` keeps the full history (V2V).
    ``i2v`` trains the format the I2V sampler feeds (anchor + last history frame only), which
    the public reference code never trains.
    """

    t2v: float = 0.4
    i2v: float = 0.06
    v2v_partial: float = 0.22

    def _validate(self, prefix: str) -> None:
        for name in ("t2v", "i2v", "v2v_partial"):
            _check(0.0 <= getattr(self, name) <= 1.0, prefix + name, "must be a probability in [0, 1]")
        total = self.t2v + self.i2v + self.v2v_partial
        _check(total <= 1.0 + 1e-6, prefix.rstrip("."), f"t2v + i2v + v2v_partial = {total:.4f} exceeds 1")


@dataclass
class CorruptConfig(Validated):
    """Frame-Aware Corrupt (§3.2.3).

    ``mode=paper``: every history frame independently draws exposure (p_exposure, scale in
    ``exposure``), noise (p_noise, level in ``noise``), down-then-up sampling (p_downsample,
    resolution reduction in ``downsample``) or clean (p_clean); the four must sum to 1.
    ``mode=reference``: the public reference code's clip-level draw (one branch per sample).
    """

    enabled: bool = True
    mode: str = "paper"
    p_exposure: float = 0.0
    p_noise: float = 0.8
    p_downsample: float = 0.1
    p_clean: float | None = 0.1  # null: whatever the other three leave (handy in sweeps)
    exposure: list[float] = field(default_factory=lambda: [0.3, 1.7])
    noise: list[float] = field(default_factory=lambda: [0.0, 0.33])
    downsample: list[float] = field(default_factory=lambda: [0.0, 0.1])

    def _validate(self, prefix: str) -> None:
        _choice(self.mode, ("paper", "reference"), prefix + "mode")
        if self.p_clean is None:
            self.p_clean = round(1.0 - self.p_exposure - self.p_noise - self.p_downsample, 12)
        probs = {k: getattr(self, k) for k in ("p_exposure", "p_noise", "p_downsample", "p_clean")}
        for k, v in probs.items():
            _check(0.0 <= v <= 1.0, prefix + k, f"must be a probability in [0, 1], got {v}")
        total = sum(probs.values())
        _check(
            math.isclose(total, 1.0, abs_tol=1e-6),
            prefix + "p_*",
            f"p_exposure + p_noise + p_downsample + p_clean must sum to 1, got {total:.6f} ({probs})",
        )
        _range(self.exposure, prefix + "exposure", 0.0, 10.0)
        _range(self.noise, prefix + "noise", 0.0, 1.0)
        _range(self.downsample, prefix + "downsample", 0.0, 0.95)


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
        _check(len(self.sizes) == 3, prefix + "sizes", "needs [long, mid, short] latent frame counts")
        _check(all(s >= 1 for s in self.sizes), prefix + "sizes", f"entries must be >= 1, got {self.sizes}")
        _check(self.window >= 1, prefix + "window", "must be >= 1")


# --------------------------------------------------------------------------- flow matching


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
        _choice(self.type, ("linear", "exponential"), prefix + "type")
        _check(self.max_seq_len > self.base_seq_len, prefix + "max_seq_len", "must exceed base_seq_len")
        _check(self.exp_cap > 1.0, prefix + "exp_cap", "must be > 1")


@dataclass
class FlowConfig(Validated):
    """Flow matching with v-prediction (target = noise - x0)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: ShiftConfig = field(default_factory=ShiftConfig)

    def _validate(self, prefix: str) -> None:
        _choice(self.timestep_sampling, ("uniform", "logit_normal"), prefix + "timestep_sampling")
        _check(self.logit_std > 0, prefix + "logit_std", "must be > 0")


@dataclass
class PyramidConfig(Validated):
    """Stage 2 (§3.3.2): ``stages`` resolutions (halved below full); each sample trains stage k with
    probability ``stage_ratios[k] / sum`` (Table 1 reference: [1, 2, 1] init, [1, 1, 1] post)."""

    stages: int = 3
    stage_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    gamma: float = 1.0 / 3.0

    def _validate(self, prefix: str) -> None:
        _check(self.stages >= 1, prefix + "stages", "must be >= 1")
        _check(len(self.stage_ratios) == self.stages, prefix + "stage_ratios", f"needs {self.stages} entries")
        _check(
            all(r >= 0 for r in self.stage_ratios) and sum(self.stage_ratios) > 0,
            prefix + "stage_ratios",
            "must be >= 0 with a positive sum",
        )
        _check(0.0 < self.gamma <= 1.0 / 3.0, prefix + "gamma", "must be in (0, 1/3]")


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
        _check(self.start_step >= 0, prefix + "start_step", "must be >= 0")
        _choice(self.r1_weighting, ("reference", "paper"), prefix + "r1_weighting")
        _check(
            bool(self.layers) or self.output_head, prefix + "layers", "no head: give layers or output_head"
        )
        _check(0.0 < self.crop <= 1.0, prefix + "crop", "must be in (0, 1]")


@dataclass
class DistillConfig(Validated):
    """Stage 3 (§3.4, Table 2). ``phase=ode``: Staged ODE Init on ODE pairs; ``phase=post``: DMD +
    GAN with real score (frozen teacher), fake score (LoRA) and the few-step generator (LoRA)."""

    phase: str = "post"
    teacher: str | None = None  # Helios-Base: real/fake score base (run dir, checkpoint, diffusers dir)
    generator_init: str | None = None  # Helios-Mid: the generator's base (default: the teacher)
    ode_pairs: str | None = None  # shards from helios.ode_pairs (phase=ode)
    steps: list[int] = field(default_factory=lambda: [2, 2, 2])
    real_cfg: float = 3.0
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
    # the current point of the step needs resident (one with the shared teacher and cached GAN gradients)
    offload: bool = False
    # with offload: the next role's base copied on a side stream while the current one computes (the
    # copy hidden, one more 14B base on the GPU: for GPUs with room for it, e.g. 141 GB)
    offload_prefetch: bool = False
    # Table-5 ablations: "w Self-Forcing" (history = the generator's own rollout instead of real data) and
    # "w Bidirectional Teacher" (the real score sees a bidirectional_frames-long segment, no history inputs)
    history_source: str = "teacher"
    real_score: str = "history"
    # the real score's unconditional branch: "negative" = the negative prompt helios.prepare encoded (the
    # reference); "empty" = the empty prompt (the paper's plain CFG)
    uncond: str = "negative"
    bidirectional_frames: int = 21
    tiny_teacher_steps: int = 60
    gan: GanConfig = field(default_factory=GanConfig)

    def _validate(self, prefix: str) -> None:
        _choice(self.phase, ("ode", "post"), prefix + "phase")
        _choice(self.history_source, ("teacher", "self_forcing"), prefix + "history_source")
        _choice(self.critic_backward, ("parts", "joint"), prefix + "critic_backward")
        _choice(self.real_score, ("history", "bidirectional"), prefix + "real_score")
        _choice(self.uncond, ("negative", "empty"), prefix + "uncond")
        _check(self.ttur >= 1, prefix + "ttur", "must be >= 1")
        _check(
            len(self.steps) >= 1 and all(s >= 1 for s in self.steps), prefix + "steps", "positive per stage"
        )
        _check(0.0 < self.ema_decay < 1.0, prefix + "ema_decay", "must be in (0, 1)")


# --------------------------------------------------------------------------- optimisation


@dataclass
class OptimConfig(Validated):
    """AdamW + diffusers LR schedule (Table 1: constant LR, grad clip 1.0)."""

    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0

    def _validate(self, prefix: str) -> None:
        _check(self.lr > 0, prefix + "lr", "must be > 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            prefix + "betas",
            "two values in [0,1)",
        )
        _check(self.eps > 0, prefix + "eps", "must be > 0")
        _check(self.weight_decay >= 0, prefix + "weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, prefix + "grad_clip", "must be >= 0 (0 disables clipping)")
        _choice(
            self.schedule,
            ("constant", "constant_with_warmup", "linear", "cosine"),
            prefix + "schedule",
        )
        _check(self.warmup_steps >= 0, prefix + "warmup_steps", "must be >= 0")


@dataclass
class TrainerConfig(Validated):
    max_steps: int = 40
    batch_size: int = 2
    grad_accum: int = 1
    # When > 0, grad_accum is derived: global_batch_size = batch_size * world_size * grad_accum.
    global_batch_size: int = 0
    log_every: int = 1
    checkpoint_every: int = 20
    keep_last: int = 3
    precision: str = "auto"
    device: str = "auto"
    # data loader processes; null: 4 on a GPU (with page-locked batches), 0 on the CPU
    num_workers: int | None = None
    progress: bool = True
    # a finite loss above this counts as divergence too (stops like a NaN, before the update); 0: off
    max_loss: float = 1.0e6

    def _validate(self, prefix: str) -> None:
        _check(self.max_steps >= 0, prefix + "max_steps", "must be >= 0")
        _check(self.batch_size >= 1, prefix + "batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, prefix + "grad_accum", "must be >= 1")
        _check(self.global_batch_size >= 0, prefix + "global_batch_size", "must be >= 0")
        _check(self.log_every >= 1, prefix + "log_every", "must be >= 1")
        _check(self.checkpoint_every >= 0, prefix + "checkpoint_every", "must be >= 0 (0 disables)")
        _check(self.keep_last >= 1, prefix + "keep_last", "must be >= 1")
        _choice(self.precision, ("auto", "fp32", "bf16"), prefix + "precision")
        _choice(self.device, ("auto", "cpu", "cuda"), prefix + "device")
        _check(self.num_workers is None or self.num_workers >= 0, prefix + "num_workers", "must be >= 0")


# --------------------------------------------------------------------------- data


@dataclass
class SyntheticConfig(Validated):
    """Moving-shapes videos with captions, written as real mp4 files and encoded like user data."""

    num_videos: int = 8
    height: int = 64
    width: int = 64
    fps: int = 8
    seed: int = 1234

    def _validate(self, prefix: str) -> None:
        _check(self.num_videos >= 1, prefix + "num_videos", "must be >= 1")
        _check(self.height % 16 == 0 and self.width % 16 == 0, prefix + "height/width", "multiples of 16")


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
        _choice(self.kind, ("synthetic", "latents"), prefix + "kind")
        _choice(self.latent_format, LATENT_FORMATS, prefix + "latent_format")
        _choice(self.on_error, ("raise", "skip"), prefix + "on_error")
        if self.kind == "latents":
            _check(bool(self.path), prefix + "path", "data=latents needs data.path=<shard directory>")


# --------------------------------------------------------------------------- parallel / sampling


@dataclass
class RoleParallelConfig(Validated):
    """Per-role ZeRO stage under ``parallel=zero2|zero3`` ("" = the backend's): stage 3's ``generator``,
    ``critic`` (fake score + GAN heads) and frozen ``real`` score (zero3: partitioned, else replicated),
    or stages 1-2's ``model``."""

    model: str = ""
    generator: str = ""
    critic: str = ""
    real: str = ""

    def chosen(self) -> dict[str, str]:
        """The roles given a stage of their own."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def _validate(self, prefix: str) -> None:
        for f in fields(self):
            _choice(getattr(self, f.name), ("", "zero2", "zero3"), prefix + f.name)


@dataclass
class ParallelConfig(Validated):
    """Data parallelism. ``ddp`` wraps the trainable model in DistributedDataParallel; ``zero2|zero3``
    give each role a DeepSpeed ZeRO engine (helios/infra/zero.py)."""

    backend: str = "ddp"
    dist_backend: str = "auto"
    find_unused_parameters: bool = False
    # parallel=ddp on several ranks: AdamW's state sharded across the ranks (ZeRO-1, torch's
    # ZeroRedundancyOptimizer; the same updates, 1/world of the 8 bytes per trainable parameter each);
    # checkpoints hold the whole state as with false. ZeRO backends shard it themselves.
    shard_optimizer: bool = True
    # parallel=ddp: the dtype of the gradient all-reduce (bf16: half the bytes, via torch's bf16
    # compression hook; the gradients the optimiser sees stay fp32)
    grad_comm: str = "fp32"
    roles: RoleParallelConfig = field(default_factory=RoleParallelConfig)
    zero_offload_optimizer: bool = False  # ZeRO-Offload: optimiser state and step on the CPU
    zero_offload_params: bool = False  # ZeRO-3 roles keep their parameters in host memory
    zero_bucket_size: int = 50_000_000
    zero3_persistence_threshold: int = 100_000
    # a collective that waits longer (a hung or dead rank) fails the job instead of blocking it
    timeout_minutes: float = 30.0

    def role_backend(self, role: str) -> str:
        return getattr(self.roles, role, "") or self.backend

    def _validate(self, prefix: str) -> None:
        _check(self.timeout_minutes > 0, prefix + "timeout_minutes", "must be > 0")
        _choice(self.backend, ("ddp", "zero2", "zero3"), prefix + "backend")
        _choice(self.dist_backend, ("auto", "gloo", "nccl"), prefix + "dist_backend")
        _choice(self.grad_comm, ("fp32", "bf16"), prefix + "grad_comm")
        _check(
            self.grad_comm == "fp32" or self.backend == "ddp",
            prefix + "grad_comm",
            "the bf16 gradient all-reduce is DDP's (ZeRO engines reduce in the gradients' own dtype)",
        )
        if self.backend == "ddp":
            for role in self.roles.chosen():
                raise ConfigError(
                    prefix + f"roles.{role}", "per-role ZeRO stages need parallel=zero2 or parallel=zero3"
                )
            for key in ("zero_offload_optimizer", "zero_offload_params"):
                _check(
                    not getattr(self, key),
                    prefix + key,
                    "ZeRO offload needs parallel=zero2 or parallel=zero3",
                )
        if self.zero_offload_params:
            _check(
                "zero3" in (self.backend, *self.roles.chosen().values()),
                prefix + "zero_offload_params",
                "parameter offload needs a ZeRO-3 role",
            )
        _check(self.zero_bucket_size > 0, prefix + "zero_bucket_size", "must be > 0")


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
            _check(0.0 < getattr(self, k) < 1.0, prefix + k, "must be in (0, 1)")
        _check(0.0 <= self.noise <= 1.0, prefix + "noise", "must be in [0, 1]")


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
    negative_prompt: str = ""
    interpolation_steps: int = 1
    adaptive: AdaptiveSamplingConfig = field(default_factory=AdaptiveSamplingConfig)

    def _validate(self, prefix: str) -> None:
        _choice(self.kind, ("unipc", "pyramid", "dmd"), prefix + "kind")
        _check(
            all(s >= 1 for s in self.steps) and self.steps, prefix + "steps", "one positive count per stage"
        )
        if self.kind == "unipc":
            _check(len(self.steps) == 1, prefix + "steps", "unipc has a single stage: steps=[N]")
        _choice(self.shift_type, ("linear", "exponential"), prefix + "shift_type")
        _choice(self.shift_order, ("stage", "diffusers"), prefix + "shift_order")
        _check(0.0 < self.gamma <= 1.0 / 3.0, prefix + "gamma", "must be in (0, 1/3]")
        _check(self.interpolation_steps >= 1, prefix + "interpolation_steps", "must be >= 1")


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
        _check(self.every >= 0, prefix + "every", "must be >= 0")
        _check(bool(self.prompts), prefix + "prompts", "needs at least one prompt")
        _check(self.num_frames >= 1, prefix + "num_frames", "must be >= 1")


@dataclass
class LoggingConfig(Validated):
    """wandb (main rank): ``logging.wandb=true``; ``mode=offline`` needs no network (``wandb sync``
    later). Name and group default to the stage/phase and, in a sweep, its values and sweep dir."""

    wandb: bool = False
    project: str = "helios"
    entity: str | None = None
    mode: str = "online"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None  # default: kept in the run dir, so a resumed run continues its wandb run

    def _validate(self, prefix: str) -> None:
        _choice(self.mode, ("online", "offline", "disabled"), prefix + "mode")


# --------------------------------------------------------------------------- root


# the paper's stages (§5.1); helios/stages maps each to its class (the config layer knows only names)
STAGE_NAMES = {1: "base", 2: "mid", 3: "distilled"}


@dataclass
class TrainConfig(Validated):
    stage: int = 1
    phase: str = "tiny"
    seed: int = 0
    resume: str = "latest"
    # Start from the weights of another run (a checkpoint folder or a run dir: its newest checkpoint);
    # optimiser state and step counter start fresh, as for the next phase of a recipe.
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _validate(self, prefix: str) -> None:
        _check(self.stage in STAGE_NAMES, "stage", f"must be one of {sorted(STAGE_NAMES)}, got {self.stage}")
        _check(bool(self.resume), "resume", "must be 'latest', 'none' or a checkpoint path")
        zero3 = [r for r in ("generator", "critic", "real") if self.parallel.role_backend(r) == "zero3"]
        _check(
            not self.distill.offload or not zero3,
            "distill.offload",
            f"the offload pool moves the frozen bases itself, ZeRO-3 partitions them ({', '.join(zero3)}): "
            "use parallel=ddp or parallel=zero2 with it, or parallel.zero_offload_params without it",
        )
        tr = self.model.transformer
        _check(
            tr.text_dim == self.model.text_encoder.d_model or self.model.text_encoder.source != "tiny",
            "model.text_encoder.d_model",
            f"tiny text encoder width {self.model.text_encoder.d_model} "
            f"!= transformer.text_dim {tr.text_dim}",
        )
        if self.stage == 3 and self.distill.shared_teacher:
            _check(
                not self.parallel.roles.real,
                "parallel.roles.real",
                "distill.shared_teacher=true runs the real score on the critic's base (no real role of its "
                "own); set parallel.roles.critic, or distill.shared_teacher=false for a separate real score",
            )
        if self.stage == 3:  # the generator is distilled and sampled on one noise schedule
            _check(
                self.validation.sampler.shift_type == self.flow.shift.type,
                "validation.sampler.shift_type",
                f"{self.validation.sampler.shift_type!r} differs from flow.shift.type "
                f"{self.flow.shift.type!r}: stage 3 trains its few-step schedule on flow.shift.type; "
                "set both to the same value",
            )
        if not self.history.multi_term_patch:
            _check(
                not self.model.lora.enabled or self.model.lora.memory_patch != "lora",
                "model.lora.memory_patch",
                "LoRA on memory patch convs needs history.multi_term_patch=true",
            )


# --------------------------------------------------------------------------- prepare


@dataclass
class ClipConfig(Validated):
    """Clip extraction for ``helios.prepare``: latent frames per clip, resolution after resize + centre
    crop, frame rate (``null`` = the source's), and the latent format:

    - ``sections`` (default, the released checkpoints' format): the clip is cut into sections of
      ``4(n-1)+1`` frames (``n = section_latents``, 33 frames for the real window 9), each encoded on
      its own, so each section's first latent is a single-frame latent; ``latent_frames`` must be a
      multiple of ``section_latents``;
    - ``clip``: the whole clip of ``4(latent_frames-1)+1`` frames in one pass (streaming decode).

    ``posterior``: ``sample`` (seeded per shard; the reference's data tool) or ``mode``."""

    latent_frames: int = 12
    height: int = 64
    width: int = 64
    fps: float | None = None
    format: str = "sections"
    section_latents: int = 3
    posterior: str = "sample"

    def _validate(self, prefix: str) -> None:
        _check(self.latent_frames >= 1, prefix + "latent_frames", "must be >= 1")
        _check(self.height % 16 == 0 and self.width % 16 == 0, prefix + "height/width", "multiples of 16")
        _check(self.fps is None or self.fps > 0, prefix + "fps", "must be > 0 or null")
        _choice(self.format, LATENT_FORMATS, prefix + "format")
        _choice(self.posterior, ("sample", "mode"), prefix + "posterior")
        _check(self.section_latents >= 1, prefix + "section_latents", "must be >= 1")
        if self.format == "sections":
            _check(
                self.latent_frames % self.section_latents == 0,
                prefix + "latent_frames",
                f"clip.format=sections cuts clips into sections of {self.section_latents} latent frames "
                f"(clip.section_latents); {self.latent_frames} is not a multiple (nearest: "
                f"{max(1, round(self.latent_frames / self.section_latents)) * self.section_latents})",
            )


@dataclass
class PrepareConfig(Validated):
    """``python -m helios.prepare input=PATH output=DIR``."""

    input: str = MISSING
    output: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    samples_per_shard: int = 16
    batch_size: int = 4
    device: str = "auto"
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT  # encoded once into negative_prompt_embeds.npy

    def _validate(self, prefix: str) -> None:
        _check(self.samples_per_shard >= 1, "samples_per_shard", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _choice(self.device, ("auto", "cpu", "cuda"), "device")


@dataclass
class TinyVaePhase(Validated):
    """One phase of the tiny VAE's training: ``steps`` steps, lr on a cosine from ``lr`` to ``lr_end``;
    every ``single_every``-th step takes ``batch_size`` single frames (1: all of them), the others
    ``sections_batch_size`` 9-frame sections (the causal temporal layers)."""

    steps: int = 1000
    lr: float = 1e-3
    lr_end: float = 1e-3
    single_every: int = 1
    sections_batch_size: int = 4

    def _validate(self, prefix: str) -> None:
        for key in ("steps", "single_every", "sections_batch_size"):
            _check(getattr(self, key) >= 1, prefix + key, "must be >= 1")
        _check(self.lr > 0 and self.lr_end > 0, prefix + "lr", "lr and lr_end must be > 0")


def _tiny_vae_phases() -> list[TinyVaePhase]:
    """The shipped VAE's lineage (helios/assets/tiny_vae/report.json): single frames until the shapes
    appear, then more and more 9-frame sections at a falling lr."""
    return [
        TinyVaePhase(steps=1500, lr=1e-3, lr_end=1e-3, single_every=1),
        TinyVaePhase(steps=8200, lr=1e-3, lr_end=2.5e-4, single_every=2, sections_batch_size=2),
        TinyVaePhase(steps=1904, lr=3e-4, lr_end=5e-5, single_every=3, sections_batch_size=4),
        TinyVaePhase(steps=3333, lr=2e-4, lr_end=2e-5, single_every=4, sections_batch_size=4),
    ]


@dataclass
class TinyVaeConfig(Validated):
    """``python -m helios.tiny_vae output=DIR``: train the tiny default's VAE on the moving-shapes world."""

    output: str = MISSING
    init: str | None = None  # continue from a VAE directory (diffusers layout) instead of a fresh init
    phases: list[TinyVaePhase] = field(default_factory=_tiny_vae_phases)
    batch_size: int = 16  # single frames per single-frame step
    base_dim: int = TINY_VAE_BASE_DIM
    kl_weight: float = 0.0  # the shipped lineage trained without it
    seed: int = 0
    held_out: int = 16
    log_every: int = 250
    threads: int = 2

    def _validate(self, prefix: str) -> None:
        _check(len(self.phases) >= 1, "phases", "needs at least one phase")
        for i, phase in enumerate(self.phases):
            phase.validate(f"phases.{i}.")
        for key in ("batch_size", "base_dim", "held_out", "log_every", "threads"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")


# --------------------------------------------------------------------------- generate


@dataclass
class GenerateConfig(Validated):
    """``python -m helios.generate checkpoint=PATH prompt="..." num_frames=N output=FILE.mp4``."""

    checkpoint: str = MISSING
    output: str = "output.mp4"
    prompt: str | None = None
    prompts_file: str | None = None  # one prompt per line: one video each (output_<i>.mp4)
    timed_prompts: str | None = None  # CSV "time,prompt" (seconds): interactive prompt switches
    # the reference code's interactive CSV "id,prompt_index,prompt[,refined_prompt]": one video per id,
    # its prompts in prompt_index order, each for sections_per_prompt sections (its interpolate_time)
    interactive_prompts: str | None = None
    sections_per_prompt: int = 7
    image: str | None = None
    video: str | None = None
    num_frames: int = 33
    height: int | None = None
    width: int | None = None
    fps: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # group: sampler=unipc|pyramid|dmd
    # how sections are decoded: "auto" = as the model's latent format requires (each section on its own
    # for the section format, streaming for whole-clip latents); "sections" / "stream" insist on one
    # and are refused for a model trained on the other format
    decode: str = "auto"

    def _validate(self, prefix: str) -> None:
        given = [
            x for x in (self.prompt, self.prompts_file, self.timed_prompts, self.interactive_prompts) if x
        ]
        _check(
            len(given) == 1,
            "prompt",
            "give exactly one of prompt=, prompts_file=, timed_prompts=, interactive_prompts=",
        )
        _check(self.sections_per_prompt >= 1, "sections_per_prompt", "must be >= 1")
        _check(self.num_frames >= 1, "num_frames", "must be >= 1")
        _check(not (self.image and self.video), "image", "give image= (I2V) or video= (V2V), not both")
        _choice(self.device, ("auto", "cpu", "cuda"), "device")
        _choice(self.dtype, ("auto", "fp32", "bf16"), "dtype")
        _choice(self.decode, ("auto", "sections", "stream"), "decode")


@dataclass
class ExportConfig(Validated):
    """``python -m helios.export checkpoint=PATH output=DIR [lora_only=true] [weights=ema]``."""

    checkpoint: str = MISSING
    output: str = MISSING
    lora_only: bool = False
    weights: str = "raw"
    overwrite: bool = False  # replace a non-empty output folder (never mixed with what was there)

    def _validate(self, prefix: str) -> None:
        _choice(self.weights, ("raw", "ema"), "weights")


@dataclass
class OdePairsConfig(Validated):
    """``python -m helios.ode_pairs teacher=PATH shards=DIR output=DIR``."""

    teacher: str = MISSING
    shards: str = MISSING
    output: str = MISSING
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            kind="pyramid", steps=[20, 20, 20], guidance_scale=5.0, cfg_zero_star=True
        )
    )
    tasks: dict = field(default_factory=lambda: {"t2v": 0.4, "i2v": 0.06, "v2v_partial": 0.22})
    max_sequence_length: int = 512
    seed: int = 0
    device: str = "auto"

    def _validate(self, prefix: str) -> None:
        _check(self.sampler.kind == "pyramid", "sampler.kind", "the teacher samples with the pyramid sampler")
        _choice(self.device, ("auto", "cpu", "cuda"), "device")
        TaskConfig(**self.tasks).validate("tasks.")


# --------------------------------------------------------------------------- fixtures


@dataclass
class FixturesConfig(Validated):
    """``python -m helios.fixtures output=DIR``: tiny models in the published Wan/Helios layouts."""

    output: str = MISSING
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 24
    text_dim: int = 32
    ffn_dim: int = 96
    videos: int = 6
    video_frames: int = 109  # clip=real: 3 sections of 33 frames (27 latents); clip.format=clip: 28
    height: int = 64
    width: int = 64
    seed: int = 0

    def _validate(self, prefix: str) -> None:
        _check(self.attention_head_dim % 6 == 0, "attention_head_dim", "must be a multiple of 6 (Wan's RoPE)")
        _check(self.num_layers >= 1 and self.videos >= 1, "num_layers/videos", "must be >= 1")
        _check(self.height % 16 == 0 and self.width % 16 == 0, "height/width", "multiples of 16")
