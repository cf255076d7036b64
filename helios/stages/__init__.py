"""Training stages of the paper (§5.1): a registry from ``stage=N`` to the stage class."""

from __future__ import annotations

from helios.config.schema import STAGE_NAMES
from helios.stages.distilled import Stage3Distilled
from helios.stages.stage1_base import Stage1Base
from helios.stages.stage2_mid import Stage2Mid

STAGES = {1: Stage1Base, 2: Stage2Mid, 3: Stage3Distilled}
assert STAGES.keys() == STAGE_NAMES.keys(), "a stage without a name in the config layer, or the reverse"

__all__ = ["STAGES", "Stage1Base", "Stage2Mid", "Stage3Distilled"]
