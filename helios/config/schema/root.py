"""The training root: :class:`TrainConfig` and its cross-field rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.config.schema.base import Validated, check
from helios.config.schema.data import DataConfig
from helios.config.schema.history_config import HistoryConfig
from helios.config.schema.model import ModelConfig
from helios.config.schema.objectives import DistillConfig, FlowConfig, PyramidConfig
from helios.config.schema.sampling import ValidationConfig
from helios.config.schema.training import (
    DISTILL_ROLES,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
)

# the paper's stages (§5.1); helios/stages maps each to its class (the config layer knows only names)
STAGE_NAMES = {1: "base", 2: "mid", 3: "distilled"}


@dataclass
class TrainConfig(Validated):
    stage: int = 1
    phase: str = "tiny"
    seed: int = 0
    resume: str = "latest"
    # Start from the weights of another run (a checkpoint folder or a run dir: its newest checkpoint);
    # optimiser state and step counter start fresh, as for the next phase of a recipe.
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def samples_per_clip(self) -> int:
        """Training samples per clip, the unit of ``trainer.global_batch_size``: stage 2 with
        ``pyramid.stage_draw=every`` trains each clip at every pyramid stage; otherwise one."""
        return self.pyramid.samples_per_clip() if self.stage == 2 else 1

    def _validate(self, prefix: str) -> None:
        check(self.stage in STAGE_NAMES, "stage", f"must be one of {sorted(STAGE_NAMES)}, got {self.stage}")
        check(bool(self.resume), "resume", "must be 'latest', 'none' or a checkpoint path")
        zero3 = [r for r in DISTILL_ROLES if self.parallel.role_backend(r) == "zero3"]
        check(
            not self.distill.offload or not zero3,
            "distill.offload",
            f"the offload pool moves the frozen bases itself, ZeRO-3 partitions them ({', '.join(zero3)}): "
            "use parallel=ddp or parallel=zero2 with it, or parallel.zero_offload_params without it",
        )
        tr = self.model.transformer
        check(
            tr.text_dim == self.model.text_encoder.d_model or self.model.text_encoder.source != "tiny",
            "model.text_encoder.d_model",
            f"tiny text encoder width {self.model.text_encoder.d_model} "
            f"!= transformer.text_dim {tr.text_dim}",
        )
        if self.stage == 3 and self.distill.shared_teacher:
            check(
                not self.parallel.roles.real,
                "parallel.roles.real",
                "distill.shared_teacher=true runs the real score on the critic's base (no real role of its "
                "own); set parallel.roles.critic, or distill.shared_teacher=false for a separate real score",
            )
        if self.stage == 3:  # the generator is distilled and sampled on one noise schedule
            check(
                self.validation.sampler.shift_type == self.flow.shift.type,
                "validation.sampler.shift_type",
                f"{self.validation.sampler.shift_type!r} differs from flow.shift.type "
                f"{self.flow.shift.type!r}: stage 3 trains its few-step schedule on flow.shift.type; "
                "set both to the same value",
            )
        if not self.history.multi_term_patch:
            check(
                not self.model.lora.enabled or self.model.lora.memory_patch != "lora",
                "model.lora.memory_patch",
                "LoRA on memory patch convs needs history.multi_term_patch=true",
            )
