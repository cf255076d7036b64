"""Training stages of the paper (§5.1): a registry from ``stage=N`` to the stage class."""

from __future__ import annotations

from helios.config.schema import STAGE_NAMES
from helios.stages.stage1_base import FlowStage
from helios.stages.stage2_mid import PyramidStage
from helios.stages.stage3_distilled import DistillStage

STAGES = {1: FlowStage, 2: PyramidStage, 3: DistillStage}
assert STAGES.keys() == STAGE_NAMES.keys(), "a stage without a name in the config layer, or the reverse"

__all__ = ["STAGES", "DistillStage", "FlowStage", "PyramidStage"]
