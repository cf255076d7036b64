"""Stage 1 (Helios-Base): flow matching of the autoregressive DiT conditioned on history (§3.1-3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios.config.schema import LoraConfig, TrainConfig
from helios.core.flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    flow_pair,
    sample_sigmas,
    shift_factor,
    shift_sigmas,
    token_count,
)
from helios.core.history import Task
from helios.core.placement import to_device
from helios.data.dataset import ClipBatch
from helios.infra.parallel import RoleSteps
from helios.model import apply_lora, build_transformer
from helios.stages.conditioning import HistoryConditioning
from helios.stages.stage import MODEL_ROLE, Stage, WeightsLoader


@dataclass
class NoisyGroup:
    """Samples of a micro-batch that share one noisy-window shape (one forward pass)."""

    index: torch.Tensor  # the clip of the batch each sample is made of (a clip may make several)
    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor  # velocity, diffusers convention: noise side minus data side
    name: str = "flow"


class Stage1Base(Stage):
    """One section per sample: history (Representation Control + Frame-Aware Corrupt) conditions
    the noisy window; the loss is the MSE between predicted and true velocity ``noise - x0``.

    Subclasses change only :meth:`noisy_groups` (how the noisy window and its target are made); the
    history comes from the shared :class:`HistoryConditioning`."""

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        super().__init__(cfg, weights)
        self.condition = HistoryConditioning(cfg)  # the history inputs of a clip batch
        self.layout = self.condition.layout

    def build_model(
        self, base_state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The transformer (+ LoRA). ``base_state`` is the base (a merged previous-phase model, see
        ``init_from``): its tensors become the model's, in ``dtype``, before the adapters are added."""
        m = self.cfg.model
        try:
            model = build_transformer(m.transformer, m.kernels, m.attention, dtype, base_state)
        except ValueError as err:
            raise ValueError(f"init_from: {err}") from None
        return apply_lora(model, self.cfg.model.lora)

    def role_loras(self) -> dict[str, LoraConfig | None]:
        """The transformers this stage trains and their adapters: one model with the run's LoRA."""
        return {MODEL_ROLE: self.cfg.model.lora}

    def noisy_groups(
        self, target: torch.Tensor, generator: torch.Generator, shared: torch.Generator
    ) -> tuple[list[NoisyGroup], dict]:
        """Single-scale flow matching: x_t = (1 - s) x0 + s noise, s logit-normal/uniform and shifted."""
        cfg = self.cfg
        b, _, w, h, wd = target.shape
        noise = torch.randn(target.shape, generator=generator)
        shift = shift_factor(token_count(w, h, wd), cfg.flow.shift)
        sigmas = shift_sigmas(sample_sigmas(b, cfg.flow, generator), shift)
        x_t, velocity = flow_pair(target, noise, sigmas)
        group = NoisyGroup(torch.arange(b), x_t, sigmas * NUM_TRAIN_TIMESTEPS, velocity)
        return [group], {"sigma_mean": float(sigmas.mean()), "shift": shift}

    def forward_backward(
        self,
        model: torch.nn.Module,
        batch: ClipBatch,
        generator: torch.Generator,
        shared: torch.Generator | None = None,
        roles: RoleSteps | None = None,
        *,
        step: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float | torch.Tensor]]:
        """One micro-batch's flow-matching loss and its backward (one role, ``model``: the trainer has
        wrapped the whole model). ``generator``: this rank's stream; ``shared``: the same on every rank
        (draws that decide the number of forward passes); ``step``: unused (no schedule over steps)."""
        device = self.device
        cond, target, stats = self.condition(batch, generator)
        groups, noisy_stats = self.noisy_groups(target, generator, shared or generator)
        total = torch.zeros((), device=device)  # pragma: no mutate (a 0-dim host tensor adds to any device)
        samples = sum(len(g.index) for g in groups)  # the loss is the mean over them
        stats["noisy_tokens"] = float(sum(len(g.index) * token_count(*g.x_t.shape[2:]) for g in groups))
        for g in groups:
            inputs = {k: to_device(v[g.index], device) for k, v in cond.items()}
            pred = model(
                hidden_states=to_device(g.x_t, device),
                timestep=to_device(g.timestep, device),
                **inputs,
                return_dict=False,
            )[0]
            loss = F.mse_loss(pred.float(), to_device(g.target, device).float())
            total = total + loss * (len(g.index) / samples)
            if g.name != "flow":
                stats[f"loss_{g.name}"] = loss.detach()  # a device scalar: read when logged
        (roles or RoleSteps()).backward(MODEL_ROLE, total)
        return {MODEL_ROLE: total.detach()}, {**stats, **noisy_stats}

    def metric_names(self) -> list[str]:
        """Every metric key this stage reports (the same on every rank and step)."""
        tasks = [f"task_{t.name.lower()}" for t in Task]
        return [
            "loss",
            "corrupt_frac",
            "history_empty",
            "noisy_tokens",
            "sigma_mean",
            "shift",
            *tasks,
            *self.extra_metric_names(),
        ]

    def extra_metric_names(self) -> list[str]:
        return []
