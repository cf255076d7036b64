"""Validation during training: videos on the fixed prompts and seeds under ``samples/``, with their
per-section drift (§3.5), seam and, for moving-shapes prompts, shapes-world measures (of the whole video
and of each section: is the caption's shape there, in its colour, moving its way)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helios.config.schema import TrainConfig
from helios.core.history import HistoryLayout
from helios.infra.distributed import DistInfo, all_gather_objects, broadcast_object
from helios.model.encoders import build_text_encoder, build_vae, encode_prompts
from helios.sampling.decode import section_frames
from helios.sampling.pipeline import generate_video, save_video
from helios.sampling.prompts import texts_to_encode
from helios.world.measures import caption_metrics, caption_section_metrics


class Validation:
    """Samples ``cfg.validation.prompts``. Their embeddings are encoded once, at start-up, before the
    models are built (:meth:`encode_prompts`): no text encoder is held while training runs. The VAE is
    built at the first call and lives on the CPU between calls."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, run_dir: Path) -> None:
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.vae: nn.Module | None = None
        self.prompt_embeds: dict[str, torch.Tensor] | None = None

    def encode_prompts(self) -> None:
        """Collective: the main rank loads the text encoder (on its GPU when it has one: nothing else is
        there yet), encodes the validation prompts and the sampler's negative prompt (unless null), frees the
        encoder and hands the embeddings to every rank."""
        embeds = None
        if self.dist.is_main:
            v = self.cfg.validation
            texts = texts_to_encode(v.prompts, v.sampler.negative_prompt)
            tokenizer, text_encoder = build_text_encoder(self.cfg.model.text_encoder)
            device = self.dist.device
            max_len = self.cfg.model.text_encoder.max_sequence_length
            encoded = encode_prompts(tokenizer, text_encoder.to(device), texts, max_len, device)
            embeds = {text: e.cpu() for text, e in zip(texts, encoded)}
            del text_encoder, encoded
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.prompt_embeds = broadcast_object(embeds)

    def prompts_of_rank(self, zero3: bool) -> list[int]:
        """The validation prompts this rank samples: the ranks share them round-robin (rank r: prompts
        r, r + world, ...); under ZeRO-3 every rank joins every prompt's forwards (the weights are
        gathered layer by layer, a collective) and the main rank writes the videos."""
        n = len(self.cfg.validation.prompts)
        if zero3:
            return list(range(n))
        return list(range(self.dist.rank, n, self.dist.world_size))

    def __call__(
        self,
        step: int,
        model: nn.Module,
        sampling: nn.Module,
        latent_hw: tuple[int, int],
        dtype: torch.dtype,
        zero3: bool,
        tracker=None,
    ) -> dict[str, float]:
        """Videos of ``sampling`` (the trained ``model``'s sampling view) at ``step``; collective: every
        rank returns every prompt's metrics and the main rank hands the videos to ``tracker``."""
        v = self.cfg.validation
        if self.prompt_embeds is None:
            self.encode_prompts()
        if self.vae is None:
            self.vae = build_vae(self.cfg.model.vae)
        vae, device = self.vae, self.dist.device
        vae.to(device)
        h, w = latent_hw
        layout = HistoryLayout.from_config(self.cfg.history)
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        sampled: list[tuple[int, Path, dict]] = []
        writes = self.dist.is_main or not zero3
        max_len = self.cfg.model.text_encoder.max_sequence_length
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        try:
            for i in self.prompts_of_rank(zero3):
                prompt = v.prompts[i]
                generator = torch.Generator().manual_seed(v.seed + i)
                with autocast:
                    result = generate_video(
                        sampling,
                        vae,
                        None,  # no tokenizer or text encoder: the prompts were encoded at start-up
                        None,
                        layout,
                        v.sampler,
                        [(0, prompt)],
                        v.num_frames,
                        h * 8,
                        w * 8,
                        generator,
                        max_len,
                        adaptive_seed=v.seed + i,
                        latent_format=self.cfg.data.latent_format,
                        prompt_embeds=self.prompt_embeds,
                    )
                out = self.run_dir / "samples" / f"step_{step}_{i}.mp4"
                video = result.frames[0].float().cpu()
                world = caption_metrics(video, prompt)  # moving-shapes prompts only
                first, frames = section_frames(layout.window, self.cfg.data.latent_format)
                world.update(caption_section_metrics(video, prompt, first, frames))
                if writes:
                    report = {**result.stats, "prompt": prompt, "rank": self.dist.rank, "world": world}
                    save_video(result.frames[0], out, v.fps, report)
                for key, value in result.stats["drift"]["max_abs_delta"].items():
                    metrics[f"val/{i}/drift_{key}"] = value
                metrics[f"val/{i}/seam_ratio"] = result.stats["seams"]["ratio"]
                metrics.update({f"val/{i}/world_{key}": value for key, value in world.items()})
                sampled.append((i, out, result.stats))
            # every rank's prompts, on every rank (the main rank logs them)
            gathered = all_gather_objects((metrics, sampled))
            for their_metrics, _ in gathered:
                metrics.update(their_metrics)
            by_prompt = {i: (out, report) for _, theirs in gathered for i, out, report in theirs}
            videos = [by_prompt[i][0] for i in sorted(by_prompt)]
            reports = [by_prompt[i][1] for i in sorted(by_prompt)]
            if tracker is not None:
                tracker.log_validation(step, videos, reports, v.fps)
            if self.dist.is_main:
                print(f"validation videos: {self.run_dir / 'samples'}", flush=True)
        finally:
            model.train(was_training)
            vae.to("cpu")
        return metrics
