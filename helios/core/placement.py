"""Host-to-device copies of the step's inputs."""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` on ``device`` (in ``dtype``), copied without the host waiting for it: a pinned host tensor
    copies while the host goes on, and the device's stream orders the copy before any use of it."""
    return x.to(device, dtype, non_blocking=True)  # pragma: no mutate (a copy hint; one device on a CPU)
