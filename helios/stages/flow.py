"""Stage 1 (Helios-Base): flow matching of the autoregressive DiT conditioned on history (§3.1-3.3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from helios.config.schema import TrainConfig
from helios.corrupt import Branch, frame_aware_corrupt
from helios.data.dataset import ClipBatch
from helios.flow import NUM_TRAIN_TIMESTEPS, flow_pair, sample_sigmas, shift_factor, shift_sigmas, token_count
from helios.history import HistoryLayout, Task, apply_tasks, draw_tasks
from helios.model import apply_lora, build_transformer


class FlowStage:
    """One section per sample: history (Representation Control + Frame-Aware Corrupt) conditions
    the noisy window; the loss is the MSE between predicted and true velocity ``noise - x0``."""

    name = "flow"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.layout = HistoryLayout.from_config(cfg.history)

    def build_model(self) -> torch.nn.Module:
        model = build_transformer(self.cfg.model.transformer)
        return apply_lora(model, self.cfg.model.lora)

    def prepare_inputs(
        self, batch: ClipBatch, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """Model inputs, velocity target and input statistics for one micro-batch."""
        cfg = self.cfg
        device = batch.latents.device
        history, target = self.layout.split_clip(batch.latents.cpu())
        b, _, w, h, wd = target.shape
        tasks = draw_tasks(b, cfg.history.tasks, generator)
        history, anchor, valid = apply_tasks(history, batch.first_latent.cpu(), tasks, self.layout, generator)
        history, branches = frame_aware_corrupt(history, valid, cfg.history.corrupt, generator)

        noise = torch.randn(target.shape, generator=generator)
        seq_len = token_count(w, h, wd)
        shift = shift_factor(seq_len, cfg.flow.shift)
        sigmas = shift_sigmas(sample_sigmas(b, cfg.flow, generator), shift)
        x_t, velocity = flow_pair(target, noise, sigmas)

        offset = None if cfg.history.relative_rope else batch.offset.cpu()
        inputs = {
            "hidden_states": x_t,
            "timestep": sigmas * NUM_TRAIN_TIMESTEPS,
            "encoder_hidden_states": batch.prompt_embeds.cpu(),
            **self.layout.model_inputs(history, anchor, offset),
        }
        inputs = {k: v.to(device) for k, v in inputs.items()}
        n_valid = max(1, int(valid.sum()))
        stats = {
            "sigma_mean": float(sigmas.mean()),
            "shift": shift,
            **{f"task_{t.name.lower()}": float((tasks == t).float().mean()) for t in Task},
            "corrupt_frac": float(((branches != Branch.CLEAN) & valid).sum()) / n_valid,
        }
        return inputs, velocity.to(device), stats

    def compute_loss(
        self, model: torch.nn.Module, batch: ClipBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, velocity, stats = self.prepare_inputs(batch, generator)
        pred = model(**inputs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), velocity.float())
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
