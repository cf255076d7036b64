"""Divergence and stop checks of a training step that cost one host synchronisation, not one per loss.

Every loss a role backpropagates is folded into device scalars (:meth:`StepGuard.observe`: no sync).
The host reads them once, where an update would follow (:meth:`StepGuard.read`: one all-reduce MAX over
ranks, so every rank reaches the same verdict, and one device-to-host copy), together with the
gradient norms that decide the update and the main rank's stop request. Under DDP / one process that
is once per step; a ZeRO engine applies its step inside its own ``step()``, so each role is read before
its engine steps at the accumulation boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from helios.infra.checkpoint import list_complete

NAN, INF = 2.0, 1.0  # codes of a non-finite loss (the larger wins the MAX)


@dataclass
class Reading:
    """What the host learns at one read: per role the worst loss since the last read and whether one was
    non-finite (``nan`` or ``inf``, else None), and the extra values (reduced with MAX over ranks)."""

    worst: dict[str, float]
    nonfinite: dict[str, str | None]
    extra: dict[str, float]


class StepGuard:
    """The worst loss per role, kept on the device until it is read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._worst: dict[str, torch.Tensor] = {}
        self._code: dict[str, torch.Tensor] = {}

    def observe(self, role: str, loss: torch.Tensor) -> None:
        """Fold ``loss`` into ``role``'s worst loss (device ops only)."""
        v = loss.detach().float().reshape(())
        code = torch.isnan(v).float() * NAN + torch.isinf(v).float() * INF
        worst = torch.where(torch.isfinite(v), v, torch.full_like(v, -math.inf))
        if role in self._worst:
            worst = torch.maximum(self._worst[role], worst)
            code = torch.maximum(self._code[role], code)
        self._worst[role], self._code[role] = worst, code

    def read(self, roles: list[str], extra: dict[str, torch.Tensor | float] | None = None) -> Reading:
        """One all-reduce (MAX) and one host copy of ``roles``' losses and ``extra``; those roles'
        losses are forgotten afterwards (the next read sees only newer ones). ``roles`` and the keys of
        ``extra`` must be the same on every rank."""
        extra = extra or {}
        none = torch.full((), -math.inf, device=self.device)
        parts = [self._worst.get(r, none) for r in roles] + [
            self._code.get(r, torch.zeros_like(none)) for r in roles
        ]
        # a NaN extra (a gradient norm) reads as +inf: MAX over ranks may drop NaNs (NCCL's fmax)
        parts += [
            torch.nan_to_num(
                torch.as_tensor(v, dtype=torch.float32).to(self.device).reshape(()), nan=math.inf
            )
            for v in extra.values()
        ]
        vec = torch.stack([p.to(self.device, torch.float32) for p in parts]) if parts else none.reshape(1)
        if dist.is_initialized() and parts:
            dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        values = vec.tolist()
        n = len(roles)
        for r in roles:
            self._worst.pop(r, None)
            self._code.pop(r, None)
        codes = {NAN: "nan", INF: "inf"}
        return Reading(
            worst=dict(zip(roles, values[:n])),
            nonfinite={r: codes.get(c) for r, c in zip(roles, values[n : 2 * n])},
            extra=dict(zip(extra, values[2 * n :])),
        )


def diverged(run_dir: Path, step: int, what: str) -> FloatingPointError:
    """The error that stops a run before a non-finite loss or gradient reaches the optimizer or a
    checkpoint, naming the step, the role and the newest checkpoint (weights from before the divergence)."""
    done = list_complete(run_dir)
    last = f"the last checkpoint, {done[-1][1]}," if done else "no checkpoint yet; the run"
    return FloatingPointError(
        f"{what} at step {step}: nothing was updated or saved; {last} is unaffected. "
        "Lower optim.lr (a resumed run applies the new value) or check the data, then resume=latest"
    )


def check_reading(
    reading: Reading, role_norms: dict[str, float], max_loss: float, run_dir: Path, step: int
) -> None:
    """A non-finite loss, one above ``trainer.max_loss`` (0: no limit) or a non-finite gradient norm stops
    the run before any update (the same verdict on every rank: the reading is reduced over ranks)."""
    for role, kind in reading.nonfinite.items():
        if kind is not None:
            raise diverged(run_dir, step, f"the {role} loss is {kind}")
    for role, worst in reading.worst.items():
        if max_loss and worst > max_loss:
            raise diverged(run_dir, step, f"the {role} loss is {worst:.4g} (> trainer.max_loss={max_loss:g})")
    for role, norm in role_norms.items():
        if not math.isfinite(norm):
            raise diverged(run_dir, step, f"the {role} gradient norm is {norm}")
