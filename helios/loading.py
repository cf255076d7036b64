"""Load a model for sampling: a training checkpoint (or run dir) or a diffusers-format Helios directory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from helios.config.load import load_config
from helios.config.schema import ConfigError, SamplerConfig, TrainConfig
from helios.core.history import HistoryLayout
from helios.infra import checkpoint as ckpt
from helios.model.encoders import build_text_encoder, build_vae
from helios.model.lora import load_trainable_state_dict, merged_state_dict
from helios.model.wan_init import load_wan_as_helios
from helios.model.weights import cast_state
from helios.sampling.pipeline import VideoResult, generate_video
from helios.stages import STAGES

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module
    layout: HistoryLayout
    max_sequence_length: int
    size: tuple[int, int] | None  # (height, width) the model was trained at, when known
    train_config: TrainConfig | None = None
    # the latent format it was trained on: "sections" (decode each section on its own) or "clip"
    latent_format: str = "sections"

    def generate(
        self,
        sampler: SamplerConfig,
        prompts: list[tuple[int, str]],
        num_frames: int,
        generator: torch.Generator,
        size: tuple[int, int] | None = None,
        **kwargs,
    ) -> VideoResult:
        """:func:`~helios.sampling.pipeline.generate_video` with this model's transformer, encoders,
        history layout, text length and latent format, at ``size`` (height, width; default: the size it
        was trained at). ``kwargs``: image, video, adaptive_seed, progress."""
        height, width = size or self.size
        return generate_video(
            self.transformer,
            self.vae,
            self.tokenizer,
            self.text_encoder,
            self.layout,
            sampler,
            prompts,
            num_frames,
            height,
            width,
            generator,
            self.max_sequence_length,
            latent_format=self.latent_format,
            **kwargs,
        )


def load_train_config(checkpoint_dir: Path) -> TrainConfig:
    """The config a checkpoint was trained with (read without its weights or optimizer state)."""
    return load_config(OmegaConf.create(ckpt.saved_config(checkpoint_dir)))


def load_checkpoint_model(
    source: str | Path, weights: str = "raw", key: str = "checkpoint", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, TrainConfig, Path]:
    """The model a training checkpoint (or run dir: its newest checkpoint) sampled with: its base
    weights (for a run started with ``init_from``, the previous run's merged model, rebuilt the same way)
    in ``dtype``, its trained tensors (fp32), and for stage 3 the generator role (with EMA weights on
    request)."""

    path = Path(source).expanduser()
    found = ckpt.resolve_resume(str(path), path, key)
    if found is None:
        raise FileNotFoundError(f"{key}={source}: no complete checkpoint there")
    cfg = load_train_config(found)
    stage = STAGES[cfg.stage](cfg, merged_weights)
    base_state = None
    if cfg.init_from and cfg.model.transformer.source != "random":  # a random base is in the checkpoint
        base_state = merged_weights(cfg.init_from, dtype=dtype)  # the function it started from (recursive)
    model = stage.build_inference_model(base_state, dtype)
    del base_state  # held by the model itself
    tensors = ckpt.load_tensors(found)
    if weights == "ema" and "ema" not in tensors:
        raise ValueError(f"weights=ema: {found} has no EMA weights (stage 3 keeps them); use weights=raw")
    if "base" in tensors:
        model.load_state_dict(tensors["base"], strict=False)
    load_trainable_state_dict(model, tensors["trainable"], strict=False)
    # stage 3: the generator role (the EMA when there is one / asked for)
    model = stage.sampling_model(model, ema=tensors.get("ema") if weights != "raw" else {})
    return model.eval(), cfg, found


def load_for_inference(
    path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    path = Path(path).expanduser()
    if (path / "model_index.json").exists():
        return _load_diffusers(path, device, dtype)
    model, cfg, _ = load_checkpoint_model(path, weights="auto")  # stage 3: the EMA generator when saved

    model.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:
        model.to(dtype)
    tokenizer, text_encoder = build_text_encoder(cfg.model.text_encoder)
    size = (cfg.data.synthetic.height, cfg.data.synthetic.width) if cfg.data.kind == "synthetic" else None
    return LoadedModel(
        model,
        build_vae(cfg.model.vae).to(device),
        tokenizer,
        text_encoder.to(device),
        HistoryLayout.from_config(cfg.history),
        cfg.model.text_encoder.max_sequence_length,
        size,
        cfg,
        cfg.data.latent_format,
    )


def _load_diffusers(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKLWan, HeliosTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    kind = json.loads((path / "transformer" / "config.json").read_text()).get("_class_name")
    if kind != "HeliosTransformer3DModel":
        raise ValueError(
            f"{path} holds a {kind}, not a Helios model: sample with a Helios directory (Helios-Base/-Mid/"
            "-Distilled or a helios.export output) or a training run"
        )
    transformer = HeliosTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder")
    layout = HistoryLayout(16, 2, 1, 9)
    return LoadedModel(
        transformer.eval().to(device),
        vae.eval().to(device),
        tokenizer,
        text_encoder.eval().to(device),
        layout,
        512,
        None,
        latent_format=exported_latent_format(path),
    )


def exported_latent_format(path: Path) -> str:
    """The latent format a diffusers Helios directory was trained on: what ``helios.export`` recorded
    in ``helios_export.json``; "clip" for this project's exports from before the section format (they
    record none); "sections" for the published checkpoints (no such file)."""
    info = path / "helios_export.json"
    if not info.exists():
        return "sections"
    return json.loads(info.read_text()).get("latent_format", "clip")


def trained_latent_format(source: str | None) -> str | None:
    """The latent format the weights at ``source`` were trained on, where that is known: a Helios
    diffusers directory (see :func:`exported_latent_format`) or a training run / checkpoint (its
    ``data.latent_format``); None for anything else (a Wan-2.1 directory, a hub id)."""
    if not source:
        return None
    path = Path(source).expanduser()
    for config, root in ((path / "transformer" / "config.json", path), (path / "config.json", path.parent)):
        if config.exists():
            if json.loads(config.read_text()).get("_class_name") != "HeliosTransformer3DModel":
                return None
            return exported_latent_format(root)
    if (path / "state.pt").exists():
        return load_train_config(path).data.latent_format
    return None


def merged_weights(
    source: str | Path, key: str = "init_from", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Plain-model weights of a run dir / checkpoint (LoRA merged, in place: the tensors of the rebuilt
    model itself) or a diffusers Helios / Wan directory, in ``dtype`` (diffusers' fp32 modules fp32)."""

    path = Path(source).expanduser()
    for sub in ("transformer", None):
        config = path / sub / "config.json" if sub else path / "config.json"
        if not config.exists():
            continue
        if json.loads(config.read_text()).get("_class_name") == "WanTransformer3DModel":
            return load_wan_as_helios(str(path), subfolder=sub, dtype=dtype).state_dict()
        from diffusers import HeliosTransformer3DModel

        return HeliosTransformer3DModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype).state_dict()
    # the weights the previous run ended with
    model, _, _ = load_checkpoint_model(path, weights="raw", key=key, dtype=dtype)
    return cast_state(merged_state_dict(model), dtype)  # the fully trained tensors (fp32 in training) too


# ---------------------------------------------------------------------- a training run's weight sources
def _source_nodes(cfg: TrainConfig) -> dict[str, tuple[object, str]]:
    """The config fields that name weights to load, as (node, attribute) by their key."""
    nodes: dict[str, tuple[object, str]] = {"init_from": (cfg, "init_from")}
    nodes.update({f"distill.{k}": (cfg.distill, k) for k in ("teacher", "generator_init")})
    for key in ("transformer", "vae", "text_encoder"):
        node = getattr(cfg.model, key)
        if node.source in ("helios", "wan", "pretrained"):
            nodes[f"model.{key}.path"] = (node, "path")
    return nodes


def weight_sources(cfg: TrainConfig) -> dict[str, str | None]:
    """Every weight source the run names, by its config key."""
    return {key: getattr(node, attr) for key, (node, attr) in _source_nodes(cfg).items()}


def pin_sources(cfg: TrainConfig, saved: dict[str, str | None] | None, warn: bool) -> None:
    """Weight sources as absolute paths, run dirs as their exact checkpoint: ``config.yaml`` and every
    checkpoint then name what the run started from, so export / generate / a later ``init_from`` rebuild the
    same weights from any working directory. A resumed run keeps the sources it started with (``saved``),
    even when a source run has trained on since (logged where ``warn``)."""
    for key, (node, attr) in _source_nodes(cfg).items():
        pinned = ckpt.pin_source(getattr(node, attr), key)
        if saved and key in saved and saved[key] != pinned:
            if warn and pinned is not None:
                log.warning("%s: resuming with the source this run started from, %s", key, saved[key])
            pinned = saved[key]
        setattr(node, attr, pinned)


def check_source_formats(cfg: TrainConfig) -> None:
    """Weights trained on one latent format are not trained on on another (the data semantics would change
    silently: a single-frame latent at every section start, or none)."""
    want = cfg.data.latent_format
    for key, source in weight_sources(cfg).items():
        if key in ("model.vae.path", "model.text_encoder.path"):
            continue
        found = trained_latent_format(source)
        if found not in (None, want):
            raise ConfigError(
                "data.latent_format",
                f"{key}={source} was trained on the {found} latent format, this run trains on {want}: "
                f"set data.latent_format={found} (with shards prepared with clip.format={found})",
            )
