"""Staged ODE Init (paper §3.4): the generator regressed onto teacher ODE pairs, one (pyramid stage, DMD
step) point at a time: on the teacher's own trajectory states (``helios.ode_pairs source=rollout``, the
reference's), or on the straight line between a stage's start and end (``source=clips``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from helios.core.placement import to_device
from helios.core.pyramid import PyramidSchedule
from helios.data.ode_pair_shards import OdePairDataset, OdeTrajectoryDataset, TensorDict, ode_pair_dataset
from helios.infra.parallel import RoleSteps
from helios.stages.distilled.phase import DistillPhase
from helios.stages.distilled.roles import DistillModule
from helios.stages.distilled.rollout import first_section, velocity


class OdeInitPhase(DistillPhase):
    def dataset(self, data_path: Path | None) -> OdePairDataset | OdeTrajectoryDataset:
        max_len = self.cfg.model.text_encoder.max_sequence_length
        return ode_pair_dataset(
            self.d.ode_pairs,
            len(self.d.steps),
            max_len,
            self.layout,
            self.cfg.seed,
            self.cfg.data.caption_dropout,
        )

    @cached_property
    def windows(self) -> list[tuple[float, float]]:
        """(t_max, t_min) of every pyramid stage: a stored timestep's sigma is its place in the window."""
        schedule = PyramidSchedule(len(self.d.steps), self.cfg.pyramid.gamma)
        return [schedule.window(k) for k in range(len(self.d.steps))]

    def step(
        self,
        m: DistillModule,
        batch: TensorDict,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ):
        """One pyramid stage k (for the micro-batch) of each sample's ODE pair: x_t regressed as
        x0 = x_t - sigma v onto the stage's end. Trajectory pairs: x_t is the teacher's state at one of the
        distilled timesteps (drawn per sample by the dataset) and sigma its place in stage k's window;
        endpoint pairs: x_t = sigma start + (1 - sigma) end at one DMD step."""
        device = self.device
        k = int(torch.randint(len(self.d.steps), (1,), generator=gen))
        if f"stage{k}_x" in batch:
            t_max, t_min = self.windows[k]
            t = batch[f"stage{k}_t"].float()
            sigma = ((t - t_min) / (t_max - t_min)).view(-1, 1, 1, 1, 1)
            batch = batch.to(device)
            x, end = batch[f"stage{k}_x"], batch[f"stage{k}_end"]
            t = to_device(t, device)
        else:
            # decided on the host (the batch arrives there), then copied without waiting for the device
            first = first_section(batch["history"])
            batch = batch.to(device)
            start, end = batch[f"stage{k}_start"], batch[f"stage{k}_end"]
            timesteps, sigmas = self.rollout.stage_schedule(k, start.shape, first)
            j = int(torch.randint(len(timesteps), (1,), generator=gen))
            sigma = float(sigmas[j])
            x = sigma * start + (1 - sigma) * end
            t = to_device(timesteps[j].expand(x.shape[0]), device)
        cond = {
            "encoder_hidden_states": batch["prompt_embeds"],
            **self.layout.model_inputs(batch["history"], batch["anchor"]),
        }
        sigma = to_device(sigma, device) if torch.is_tensor(sigma) else sigma
        with self.roles.resident("generator"):
            x0 = x - sigma * roles.forward("generator", velocity, m.generator, x, t, cond)
            loss = self.d.ode_weight * F.mse_loss(x0, end.float())
            roles.backward("generator", loss)
        return {"generator": loss.detach()}, {"loss_ode": loss.detach(), "ode_stage": float(k)}

    def metric_names(self) -> list[str]:
        return ["loss", "loss_ode", "ode_stage"]
