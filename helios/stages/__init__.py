"""Training stages of the paper (§5.1): a registry from ``stage=N`` to the stage class."""

from __future__ import annotations

from helios.stages.flow import FlowStage

STAGES = {1: FlowStage}

__all__ = ["STAGES", "FlowStage"]
