"""Stage 3 (Helios-Distilled): Adversarial Hierarchical Distillation (paper §3.4, Eq. 10-16, Table 2).

:class:`Stage3Distilled` wires the parts of this package to the trainer's hooks: the roles (generator, fake
score + GAN heads, real score; :mod:`.roles`; the generator's EMA is declared on its role and kept by the
trainer, :class:`helios.infra.ema.ModelEma`), the Staged Backward Simulation (:mod:`.rollout`) and the phase
of ``distill.phase`` (``ode``: Staged ODE Init, :mod:`.ode_init`; ``post``: DMD + GAN, :mod:`.post`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helios.config.schema import ConfigError, LoraConfig, TrainConfig
from helios.infra.ema import with_ema
from helios.infra.model_roles import Role
from helios.infra.parallel import RoleSteps
from helios.stages.conditioning import HistoryConditioning
from helios.stages.distilled.ode_init import OdeInitPhase
from helios.stages.distilled.phase import DistillPhase
from helios.stages.distilled.post import PostPhase
from helios.stages.distilled.roles import DistillModule, DistillRoles
from helios.stages.distilled.rollout import StagedRollout
from helios.stages.stage import Stage, WeightsLoader


class Stage3Distilled(Stage):
    """Helios-Distilled (§3.4): the roles and the phase of ``distill.phase`` behind the stage contract."""

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        super().__init__(cfg, weights)
        self.d = cfg.distill
        self.condition = HistoryConditioning(cfg)  # real histories: Pure Teacher Forcing (§3.4)
        self.layout = self.condition.layout
        self.roles = DistillRoles(cfg, lambda source, dtype: self.load_weights(source, dtype=dtype))
        self.rollout = StagedRollout(cfg)
        parts = (cfg, self.roles, self.rollout, self.layout, lambda: self.device)
        self.phase: DistillPhase = (
            OdeInitPhase(*parts) if self.d.phase == "ode" else PostPhase(*parts, condition=self.condition)
        )

    # ------------------------------------------------------------------ setup and roles
    def setup(self, data_path: Path, dist) -> None:
        """Check the teacher and the ODE pairs are named (the tiny default's: ``bench/tiny_recipe.py``), then
        the phase's own setup (post: the real score's unconditional prompt)."""
        super().setup(data_path, dist)
        if self.d.teacher is None:
            raise ConfigError(
                "distill.teacher",
                "stage 3 needs the teacher (Helios-Base): a run dir, checkpoint or diffusers directory "
                "(for the tiny model, train_helios.py makes a tiny one: bench/tiny_recipe.py)",
            )
        if self.d.phase == "ode" and self.d.ode_pairs is None:
            raise ConfigError(
                "distill.ode_pairs", "phase=ode needs ODE pairs: python -m helios.ode_pairs ..."
            )
        self.phase.setup(data_path)

    def make_dataset(self, data_path: Path):
        return self.phase.dataset(data_path)

    def role_loras(self) -> dict[str, LoraConfig | None]:
        return self.roles.loras()

    def build_model(
        self, base_state: dict | None = None, dtype: torch.dtype = torch.float32
    ) -> DistillModule:
        return self.roles.build(base_state, dtype)

    def build_inference_model(
        self, base_state: dict | None = None, dtype: torch.dtype = torch.float32
    ) -> DistillModule:
        return self.roles.build_generator(base_state, dtype)

    def training_roles(self, model: DistillModule) -> list[Role]:
        return self.roles.training_roles(model)

    def place(self, model: DistillModule, device: torch.device) -> bool:
        return self.roles.place(model, device)

    def release(self) -> None:
        self.roles.release()

    def sampling_model(self, model: DistillModule, ema: dict | None = None) -> nn.Module:
        """The generator; with ``ema`` (export, generate) a copy holding the EMA weights. During training
        validation the trainer's EMA is written into the generator itself (no copy of a 14B base), so the
        generator is returned as it is."""
        return with_ema(model.generator, "generator", ema)

    # ------------------------------------------------------------------ steps
    def forward_backward(
        self,
        model,
        batch,
        generator: torch.Generator,
        shared: torch.Generator | None = None,
        roles: RoleSteps | None = None,
        *,
        step: int,
    ):
        """One micro-batch of the phase at optimizer step ``step`` (TTUR, the GAN's start and the re-noise
        annealing follow it): each role's forward and backward run through ``roles`` (the trainer's: the
        role's DDP wrapper or ZeRO engine), one role's graph at a time."""
        return self.phase.step(model, batch, generator, shared or generator, roles or RoleSteps(), step)

    def metric_names(self) -> list[str]:
        return self.phase.metric_names()
