"""Command schemas: prepare, the tiny VAE, generate, export, ode_pairs and the test fixtures."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from helios.config.schema.base import REFERENCE_NEGATIVE_PROMPT, Validated, check, choice
from helios.config.schema.data import LATENT_FORMATS
from helios.config.schema.history_config import TaskConfig
from helios.config.schema.model import TINY_VAE_BASE_DIM, ModelConfig
from helios.config.schema.sampling import SamplerConfig


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
        check(self.latent_frames >= 1, prefix + "latent_frames", "must be >= 1")
        check(self.height % 16 == 0 and self.width % 16 == 0, prefix + "height/width", "multiples of 16")
        check(self.fps is None or self.fps > 0, prefix + "fps", "must be > 0 or null")
        choice(self.format, LATENT_FORMATS, prefix + "format")
        choice(self.posterior, ("sample", "mode"), prefix + "posterior")
        check(self.section_latents >= 1, prefix + "section_latents", "must be >= 1")
        if self.format == "sections":
            check(
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
    # processes decoding videos while the encoders run; null: 4 on a GPU, 0 (in-process) on the CPU
    decode_workers: int | None = None
    device: str = "auto"
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT  # encoded once into negative_prompt_embeds.npy

    def _validate(self, prefix: str) -> None:
        check(self.samples_per_shard >= 1, "samples_per_shard", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.decode_workers is None or self.decode_workers >= 0, "decode_workers", "must be >= 0")
        choice(self.device, ("auto", "cpu", "cuda"), "device")


@dataclass
class TinyVaePhase(Validated):
    """One phase of the tiny VAE's training: ``steps`` steps, lr on a cosine from ``lr`` to ``lr_end``;
    every ``single_every``-th step takes ``batch_size`` single frames (1: all of them), the others
    ``sections_batch_size`` 9-frame sections (the causal temporal layers); ``anywhere``: shapes start
    anywhere on the torus, so borders are crossed as often as in the long training videos (else they start
    in the frame's middle, and a single frame never shows a shape split across a border)."""

    steps: int = 1000
    lr: float = 1e-3
    lr_end: float = 1e-3
    single_every: int = 1
    sections_batch_size: int = 4
    anywhere: bool = False

    def _validate(self, prefix: str) -> None:
        for key in ("steps", "single_every", "sections_batch_size"):
            check(getattr(self, key) >= 1, prefix + key, "must be >= 1")
        check(self.lr > 0 and self.lr_end > 0, prefix + "lr", "lr and lr_end must be > 0")


def _tiny_vae_phases() -> list[TinyVaePhase]:
    """The shipped VAE's lineage (helios/assets/tiny_vae/report.json): single frames until the shapes
    appear, then more and more 9-frame sections at a falling lr, then shapes anywhere on the torus (split
    across the borders, as a long video shows them)."""
    return [
        TinyVaePhase(steps=1500, lr=1e-3, lr_end=1e-3, single_every=1),
        TinyVaePhase(steps=8200, lr=1e-3, lr_end=2.5e-4, single_every=2, sections_batch_size=2),
        TinyVaePhase(steps=1904, lr=3e-4, lr_end=5e-5, single_every=3, sections_batch_size=4),
        TinyVaePhase(steps=3333, lr=2e-4, lr_end=2e-5, single_every=4, sections_batch_size=4),
        TinyVaePhase(steps=1500, lr=1e-4, lr_end=1e-5, single_every=4, sections_batch_size=4, anywhere=True),
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
        check(len(self.phases) >= 1, "phases", "needs at least one phase")
        for i, phase in enumerate(self.phases):
            phase.validate(f"phases.{i}.")
        for key in ("batch_size", "base_dim", "held_out", "log_every", "threads"):
            check(getattr(self, key) >= 1, key, "must be >= 1")


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
    progress: bool = True  # a line per section on stderr (k/N, seconds, frames/s)

    def _validate(self, prefix: str) -> None:
        given = [
            x for x in (self.prompt, self.prompts_file, self.timed_prompts, self.interactive_prompts) if x
        ]
        check(
            len(given) == 1,
            "prompt",
            "give exactly one of prompt=, prompts_file=, timed_prompts=, interactive_prompts=",
        )
        check(self.sections_per_prompt >= 1, "sections_per_prompt", "must be >= 1")
        check(self.num_frames >= 1, "num_frames", "must be >= 1")
        check(not (self.image and self.video), "image", "give image= (I2V) or video= (V2V), not both")
        choice(self.device, ("auto", "cpu", "cuda"), "device")
        choice(self.dtype, ("auto", "fp32", "bf16"), "dtype")
        choice(self.decode, ("auto", "sections", "stream"), "decode")


@dataclass
class ExportConfig(Validated):
    """``python -m helios.export checkpoint=PATH output=DIR [lora_only=true] [weights=ema]``."""

    checkpoint: str = MISSING
    output: str = MISSING
    lora_only: bool = False
    weights: str = "raw"
    overwrite: bool = False  # replace a non-empty output folder (never mixed with what was there)

    def _validate(self, prefix: str) -> None:
        choice(self.weights, ("raw", "ema"), "weights")


@dataclass
class OdePairsConfig(Validated):
    """``python -m helios.ode_pairs teacher=PATH shards=DIR output=DIR``.

    ``source=rollout`` (default, how the released Helios-Distilled was initialised): per caption of the
    shards the teacher samples a ``sections``-section T2V video of its own, each section conditioned on its
    earlier ones, and every (section, pyramid stage) keeps the teacher's states at the distilled schedule's
    timesteps (``dmd_steps``; the nearest of its own steps) and the stage's end. ``source=clips``: one
    section per real clip on that clip's history, keeping each stage's start and end (the ODE-init phase
    then regresses points on the straight line between them)."""

    teacher: str = MISSING
    shards: str = MISSING
    output: str = MISSING
    source: str = "rollout"
    # the reference's: Pyramid UniPC 20/20/20, CFG 5 against Wan's negative prompt, linear shift, no CFG-Zero*
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            kind="pyramid", steps=[20, 20, 20], guidance_scale=5.0, cfg_zero_star=False, shift_type="linear"
        )
    )
    sections: int = 5  # source=rollout: sections per video (the reference: 165 frames = 5)
    dmd_steps: list[int] = field(default_factory=lambda: [2, 2, 2])  # the generator's distill.steps
    amplify_first: bool = True  # its doubled first-section schedule
    tasks: dict = field(default_factory=lambda: {"t2v": 0.4, "i2v": 0.0, "v2v_partial": 0.24})  # source=clips
    max_sequence_length: int = 512
    seed: int = 0
    device: str = "auto"
    # pairs to write (null: one per clip / caption); the ODE-init phase consumes its steps x global batch
    # (Table 2: 3,759 x 128 = 481,152); the reference's maintainers found a few thousand enough
    pairs: int | None = None

    def _validate(self, prefix: str) -> None:
        choice(self.source, ("rollout", "clips"), "source")
        check(self.sampler.kind == "pyramid", "sampler.kind", "the teacher samples with the pyramid sampler")
        check(self.sections >= 1, "sections", "must be >= 1")
        check(
            len(self.dmd_steps) == len(self.sampler.steps) and all(s >= 1 for s in self.dmd_steps),
            "dmd_steps",
            "one positive count per pyramid stage of the teacher's sampler",
        )
        choice(self.device, ("auto", "cpu", "cuda"), "device")
        TaskConfig(**self.tasks).validate("tasks.")
        check(self.pairs is None or self.pairs >= 1, "pairs", "must be >= 1")


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
        check(self.attention_head_dim % 6 == 0, "attention_head_dim", "must be a multiple of 6 (Wan's RoPE)")
        check(self.num_layers >= 1 and self.videos >= 1, "num_layers/videos", "must be >= 1")
        check(self.height % 16 == 0 and self.width % 16 == 0, "height/width", "multiples of 16")
