"""Training stages of the paper (§5.1): a registry from ``stage=N`` to the stage class."""

from __future__ import annotations

from helios.config.schema import STAGE_NAMES
from helios.stages.distill import DistillStage
from helios.stages.flow import FlowStage
from helios.stages.pyramid import PyramidStage

STAGES = {1: FlowStage, 2: PyramidStage, 3: DistillStage}
assert STAGES.keys() == STAGE_NAMES.keys(), "a stage without a name in the config layer, or the reverse"

__all__ = ["STAGES", "DistillStage", "FlowStage", "PyramidStage"]
