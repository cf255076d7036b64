"""What the trainer asks of a stage: one base class with every hook the trainer and the inference
loader call, each with a default, so no caller probes a stage for optional methods."""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from helios.config.schema import LoraConfig, TrainConfig
from helios.infra.model_roles import Role
from helios.infra.parallel import RoleSteps

# plain-model weights of a run dir, checkpoint or diffusers directory (helios.loading.merged_weights): a
# stage that starts from another run's model (stage 3's teacher) is given the loader by its builder,
# which sits above the stages (the loader itself builds stages)
WeightsLoader = Callable[..., dict[str, torch.Tensor]]


MODEL_ROLE = "model"  # the one role of a stage whose whole model trains (one optimiser group)


class Stage(abc.ABC):
    """A training stage is a small object; the loop (optimiser, parallelism, logging, checkpoints)
    lives in :class:`helios.trainer.Trainer` and is shared by all stages."""

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu")  # where the model computes (set by setup)
        self._weights = weights

    def load_weights(self, source: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Plain-model weights of ``source`` (a run dir, checkpoint or diffusers directory) in ``dtype``."""
        if self._weights is None:
            raise RuntimeError(f"{type(self).__name__} was built without a weights loader; it needs {source}")
        return self._weights(source, dtype=dtype)

    # ------------------------------------------------------------------ data
    def setup(self, data_path: Path | None, dist) -> None:
        """Resolve what the stage needs besides the clips (stage 3: teacher, ODE pairs, empty prompt);
        an override calls this one first."""
        if dist is not None:
            self.device = dist.device

    def make_dataset(self, data_path: Path | None) -> torch.utils.data.Dataset | None:
        """The stage's own training data, or None for the clip dataset of ``data``."""
        return None

    # ------------------------------------------------------------------ model and roles
    @abc.abstractmethod
    def build_model(
        self, base_state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
    ) -> nn.Module:
        """The module whose trainable parameters the optimiser updates (before any wrapping): frozen
        bases in ``dtype`` (the compute dtype), held once (``base_state``'s tensors themselves)."""

    def build_inference_model(
        self, base_state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
    ) -> nn.Module:
        """The module a checkpoint is loaded into for export and generation."""
        return self.build_model(base_state, dtype)

    @abc.abstractmethod
    def role_loras(self) -> dict[str, LoraConfig | None]:
        """Each transformer the stage builds and its adapters (None: frozen): the memory model's roles."""

    def training_roles(self, model: nn.Module) -> list[Role]:
        """The model's roles, each one DDP wrapper or ZeRO engine with its own learning rate (stages 1-2: the
        whole model is the one role ``model``, at ``optim.lr``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [Role(MODEL_ROLE, model, params, self.cfg.optim.lr)]

    def place(self, model: nn.Module, device: torch.device) -> bool:
        """Put the model on ``device`` itself (True; stage 3's offload pool), or leave it to the trainer."""
        return False

    def sampling_model(self, model: nn.Module, ema: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The module the section sampler runs (stage 3: the generator, with ``ema`` its EMA weights)."""
        return model

    # ------------------------------------------------------------------ step
    @abc.abstractmethod
    def forward_backward(
        self,
        model: nn.Module,
        batch,
        generator: torch.Generator,
        shared: torch.Generator | None = None,
        roles: RoleSteps | None = None,
        *,
        step: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float | torch.Tensor]]:
        """One micro-batch's forwards and backwards (the batch on the host, pinned: the stage conditions it
        there, with the run's CPU random streams, and copies what the model needs to :attr:`device` without
        waiting for it). The stage runs each role's backward itself through ``roles`` (default: plain
        autograd) and returns the detached loss of every role it trained, by optimiser group name, and
        scalar metrics: floats, or detached device scalars, which the trainer reads only on logged steps
        (no host sync per step). ``generator``: this rank's stream; ``shared``: the same on every rank;
        ``step``: the optimizer step being computed (0-based: the number of updates so far)."""

    def metric_names(self) -> list[str] | None:
        """Every metric key the stage reports (the same on every rank), or None: the keys seen."""
        return None

    # ------------------------------------------------------------------ teardown
    def release(self) -> None:
        """Free what the stage holds outside the model when the run ends (stage 3: the offload pool)."""
        return None
