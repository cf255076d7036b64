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

from helios.infra.checkpoint import CorruptCheckpoint, list_complete, read_meta

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


def weight_stats(tensors: dict[str, torch.Tensor]) -> dict[str, float | bool]:
    """Root mean square of a set of weights (over every element) and whether all are finite: recorded with
    each checkpoint, so a divergence can tell which checkpoints hold weights that already blew up."""
    total, count, finite = 0.0, 0, True
    for t in tensors.values():
        x = t.detach().double()
        finite = finite and bool(torch.isfinite(x).all())
        total += float(x.square().sum()) if finite else 0.0
        count += x.numel()
    return {"rms": math.sqrt(total / count) if count and finite else math.inf, "finite": finite}


# a checkpoint whose trainable weights grew this many times beyond their size at the run's start is taken
# for one the divergence already reached (training moves weights by small factors; a blown-up update by 1e3+)
BLOWN_UP = 10.0


def _growth(path: Path) -> float | None:
    """How many times larger a checkpoint's weights are than at the run's start (None: not recorded)."""
    try:
        meta = read_meta(path)
    except CorruptCheckpoint:
        return None
    rms, start = meta.get("weights_rms"), meta.get("initial_weights_rms")
    if rms is None or not start:
        return None
    return rms / start if math.isfinite(rms) else math.inf


def diverged(run_dir: Path, step: int, what: str) -> FloatingPointError:
    """The error that stops a run before a non-finite loss or gradient reaches the optimizer or a
    checkpoint, naming the step, the role and the checkpoint to continue from: the newest one whose
    weights have not already blown up (its weights' size against the run's start, recorded at each save)."""
    done = [path for _, path in list_complete(run_dir)]
    head = f"{what} at step {step}: nothing was updated or saved; "
    fix = "Lower optim.lr (a resumed run applies the new value) or check the data"
    if not done:
        return FloatingPointError(head + f"no checkpoint yet. {fix}, then rerun")
    growth = {path: _growth(path) for path in done}
    healthy = [path for path in done if growth[path] is None or growth[path] <= BLOWN_UP]

    def size(path: Path) -> str:
        g = growth[path]
        return "no weight statistics recorded" if g is None else f"weights {g:.3g}x their size at the start"

    newest = done[-1]
    if healthy and healthy[-1] == newest:
        return FloatingPointError(
            head + f"the last checkpoint, {newest}, is unaffected ({size(newest)}). {fix}, then resume=latest"
        )
    affected = f"the last checkpoint, {newest}, is already affected ({size(newest)})"
    if healthy:
        good = healthy[-1]
        return FloatingPointError(
            head + f"{affected}; the newest that is not is {good} ({size(good)}). {fix}, then resume={good} "
            "(the newer checkpoints move aside to checkpoints/abandoned/, kept)"
        )
    return FloatingPointError(
        head + f"{affected}, and so is every earlier one. {fix}, then start again with resume=none "
        "(the checkpoints move aside to checkpoints/abandoned/, kept)"
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
