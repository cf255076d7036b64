"""Unified History Injection of a clip batch (paper §3.1-3.3), shared by the stages that train on real
clips: each sample's history format (T2V, I2V, V2V), Representation Control, Frame-Aware Corrupt with the
first-frame anchor, and the model's history inputs (Multi-Term Memory Patchification's layout)."""

from __future__ import annotations

import torch

from helios.config.schema import TrainConfig
from helios.core.corrupt import Branch, frame_aware_corrupt
from helios.core.history import HistoryLayout, Task, apply_tasks, draw_tasks
from helios.data.dataset import ClipBatch


class HistoryConditioning:
    """``conditioning(batch, generator)``: (the model's history inputs and prompt, the clean noisy-window
    latents, statistics), drawn with this rank's ``generator``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.layout = HistoryLayout.from_config(cfg.history)

    def __call__(self, batch: ClipBatch, generator: torch.Generator) -> tuple[dict, torch.Tensor, dict]:
        """History inputs of the model, the clean noisy-window latents, and statistics."""
        cfg = self.cfg
        history, target = self.layout.split_clip(batch.latents)
        b = target.shape[0]
        tasks = draw_tasks(b, cfg.history.tasks, generator)
        history, anchor, valid = apply_tasks(
            history,
            batch.first_latent,
            tasks,
            self.layout,
            generator,
            batch.history_frames,
            section_format=cfg.data.latent_format == "sections",
        )
        history, branches, anchor = frame_aware_corrupt(
            history, valid, cfg.history.corrupt, generator, anchor, self.layout.window
        )
        offset = None if self.layout.relative_rope else batch.offset  # absolute: the window's start
        inputs = {
            "encoder_hidden_states": batch.prompt_embeds,
            **self.layout.model_inputs(history, anchor, offset),
        }
        n_valid = max(1, int(valid.sum()))
        stats = {
            **{f"task_{t.name.lower()}": float((tasks == t).float().mean()) for t in Task},
            "corrupt_frac": float(((branches != Branch.CLEAN) & valid).sum()) / n_valid,
            "history_empty": float((~valid.any(dim=1)).float().mean()),  # T2V or a video's first section
        }
        return inputs, target, stats
