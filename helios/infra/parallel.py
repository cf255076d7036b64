"""Per-role data parallelism for stages with several roles (stage 3: generator, critic).

Each trainable role gets its own DistributedDataParallel wrapper (``RoleCall``: its forward runs the
closure the stage passes), so a role's gradients are all-reduced by its own backward, which the stage
runs as soon as that role's loss is complete (:class:`TrainerRoleSteps`); a role without a loss in an
iteration (TTUR) has no backward and so no all-reduce of zero gradients. Under ZeRO the role's engine
does the backward (helios/infra/zero.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from helios.infra.guard import StepGuard

T = TypeVar("T")


class RoleSteps:
    """How a stage runs each role's forward and backward inside its step (paper §4.2: the generator's and
    the critic's graphs are never alive at the same time, so one role's backward runs before the next
    role's forward). The stage runs every backward itself; the optimiser step stays at the end of the
    training step.

    This default (a stage called outside the trainer: tests, tools) runs a forward as a plain call and a
    backward at once by autograd. The trainer's :class:`TrainerRoleSteps` runs a role's forward through
    that role's DDP wrapper and its backward by DDP (scaled for accumulation) or the role's ZeRO engine."""

    def forward(self, role: str, fn: Callable[..., T], *args: Any, final: bool = True) -> T:
        """``fn(*args)`` as ``role``'s forward pass; ``final=False``: another forward + backward of this
        role follows in this micro-batch (see :meth:`splittable`)."""
        return fn(*args)

    def backward(self, role: str, loss: torch.Tensor) -> None:
        """``role``'s loss (or a part of it) is complete: its backward, now."""
        loss.backward()

    def splittable(self, role: str) -> bool:
        """Whether ``role``'s loss may be backpropagated in parts, each part's graph freed before the
        next part's forward (the gradients add up; DDP all-reduces them once, at the final part)."""
        return True


class RoleCall(nn.Module):
    """One role's modules behind a ``forward(fn, *args) = fn(*args)``: DDP wraps the role, and the
    stage's closure (a rollout, the critic's losses) is that role's forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)


def wrap_ddp(
    module: nn.Module,
    device: torch.device,
    find_unused: bool,
    frozen_elsewhere: bool,
    grad_comm: str = "fp32",
) -> DistributedDataParallel:
    """DDP with gradients as bucket views (no second copy); ``frozen_elsewhere``: the frozen weights
    live in the offload pool (host memory, equal on all ranks) and are left out of DDP's broadcasts;
    ``grad_comm=bf16``: gradients all-reduced in bf16 (half the bytes; torch's compression hook casts
    each bucket and back, so the optimiser still sees fp32 gradients)."""
    if frozen_elsewhere:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [n for n, p in module.named_parameters() if not p.requires_grad]
        )
    wrapped = DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        gradient_as_bucket_view=True,
    )
    if grad_comm == "bf16":
        wrapped.register_comm_hook(None, bf16_all_reduce)
    return wrapped


def bf16_all_reduce(process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's bf16 compression hook (each bucket cast to bf16 and divided by the world size, all-reduced,
    copied back in place): torch registers its own only on NCCL; gloo (CPU runs) reduces bf16 as well."""
    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


# DDP checks a hook's annotations as objects (this module's are strings: ``from __future__``)
bf16_all_reduce.__annotations__ = {
    "process_group": dist.ProcessGroup,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class TrainerRoleSteps(RoleSteps):
    """The trainer's role steps of one micro-batch: forwards through the role's DDP wrapper (gradient
    all-reduce only on the last micro-batch of an accumulation), backwards at once by DDP/autograd
    (loss / accumulation) or by the role's ZeRO engine. Each loss goes to the divergence ``guard``
    (no host sync); a ZeRO engine updates inside its ``step()``, so at the accumulation boundary
    ``verify(role)`` reads the guard first (helios/infra/guard.py)."""

    def __init__(
        self,
        roles: list[str],
        wrappers: dict[str, DistributedDataParallel],
        engines,
        grad_accum: int,
        sync: bool,
        guard: StepGuard,
        verify: Callable[[str], None],
    ) -> None:
        self.roles, self.wrappers, self.engines = roles, wrappers, engines
        self.grad_accum, self.sync = grad_accum, sync
        self.guard, self.verify = guard, verify

    def _trained(self, role: str) -> str:
        """``role``, one of the trained roles (a misnamed role would bypass its wrapper and its guard)."""
        if role not in self.roles:
            raise KeyError(f"{role!r} is not a trained role of this run ({', '.join(self.roles)})")
        return role

    def forward(self, role: str, fn: Callable[..., T], *args: Any, final: bool = True) -> T:
        wrapper = self.wrappers.get(self._trained(role))
        if wrapper is None:
            return fn(*args)
        # what no_sync() sets, for this role's forward: a part before the final one accumulates locally
        wrapper.require_backward_grad_sync = self.sync and final
        return wrapper(fn, *args)

    def splittable(self, role: str) -> bool:
        self._trained(role)
        return self.engines is None  # a ZeRO engine takes one backward per micro-batch

    def backward(self, role: str, loss: torch.Tensor) -> None:
        self.guard.observe(self._trained(role), loss)
        if self.engines is not None:
            self.engines.backward(role, loss)
            if self.sync:
                self.verify(role)
            self.engines.step(role)
        else:
            (loss / self.grad_accum).backward()
