"""Staged ODE Init (paper §3.4): the generator regressed onto teacher ODE pairs, one (pyramid stage, DMD
step) point at a time."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from helios.data.ode_pair_shards import OdePairDataset, TensorDict
from helios.infra.parallel import RoleSteps
from helios.stages.distilled.phase import DistillPhase
from helios.stages.distilled.roles import DistillModule
from helios.stages.distilled.rollout import first_section, velocity


class OdeInitPhase(DistillPhase):
    def dataset(self, data_path: Path | None) -> OdePairDataset:
        return OdePairDataset(
            self.d.ode_pairs, len(self.d.steps), self.cfg.model.text_encoder.max_sequence_length
        )

    def step(
        self,
        m: DistillModule,
        batch: TensorDict,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ):
        """One (stage, DMD step) point of an ODE pair, x_t between the stage's start and end, regressed as
        x0 = x_t - sigma v onto the stage's end."""
        device = self.device
        k = int(torch.randint(len(self.d.steps), (1,), generator=gen))
        # decided on the host (the batch arrives there), then copied without waiting for the device
        first = first_section(batch["history"])
        batch = batch.to(device)
        start, end = batch[f"stage{k}_start"], batch[f"stage{k}_end"]
        timesteps, sigmas = self.rollout.stage_schedule(k, start.shape, first)
        j = int(torch.randint(len(timesteps), (1,), generator=gen))
        sigma = float(sigmas[j])
        x = sigma * start + (1 - sigma) * end
        cond = {
            "encoder_hidden_states": batch["prompt_embeds"],
            **self.layout.model_inputs(batch["history"], batch["anchor"]),
        }
        t = timesteps[j].expand(x.shape[0]).to(device, non_blocking=True)
        x0 = x - sigma * roles.forward("generator", velocity, m.generator, x, t, cond)
        loss = self.d.ode_weight * F.mse_loss(x0, end.float())
        return loss, {"loss_ode": loss.detach(), "ode_stage": float(k)}

    def metric_names(self) -> list[str]:
        return ["loss", "loss_ode", "ode_stage"]
