"""Gradient checkpointing whose saved block inputs wait in host memory (``model.transformer.
checkpoint_offload``; the offload of paper §4.2 applied to activations).

With gradient checkpointing a block keeps only its input (the residual stream entering it, [B, L, D])
until the backward recomputes it: 40 of them per 14B forward, 4.5 GiB per full-resolution sample. Here
each is copied to pinned host memory as the forward saves it, and back to the device when the backward
recomputes that block, so the device holds one block's input at a time. The computation is unchanged
(the same tensors, copied); the cost is one device-to-host and one host-to-device copy of each input,
on the compute stream (ordered by it: no synchronisation).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


class OffloadedCheckpoint:
    """diffusers' ``gradient_checkpointing_func``: ``checkpoint(block, hidden_states, ...)`` with
    ``hidden_states`` saved on the host. Counts what it moved (``moved_bytes``, ``largest_bytes``) for
    the memory model and the tests."""

    def __init__(self) -> None:
        self.moved_bytes = 0
        self.largest_bytes = 0
        self.keep: Callable[[torch.Tensor], Any] = lambda t: t  # the other inputs, saved as they are

    def to_host(self, t: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        host.copy_(t, non_blocking=t.is_cuda)
        nbytes = t.numel() * t.element_size()
        self.moved_bytes += nbytes
        self.largest_bytes = max(self.largest_bytes, nbytes)
        return t.device, host

    @staticmethod
    def to_device(saved: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, host = saved
        return host.to(device, non_blocking=host.is_pinned())

    def __call__(self, block: Callable[..., Any], hidden_states: torch.Tensor, *args: Any) -> Any:
        # non-reentrant checkpointing saves the block's inputs through these hooks before it enters its
        # own (which hold what the block saves inside): only the residual stream moves, the inputs shared
        # by every block (text, timestep projection, RoPE) stay where they are
        residual = weakref.ref(hidden_states)  # a closure holding the tensor would keep it on the device

        def pack(t: torch.Tensor) -> Any:
            return (self.to_host(t),) if t is residual() else self.keep(t)

        def unpack(saved: Any) -> torch.Tensor:
            return self.to_device(saved[0]) if isinstance(saved, tuple) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(block, hidden_states, *args, use_reentrant=False)


def enable_checkpointing(model: torch.nn.Module, offload: bool) -> None:
    """Gradient checkpointing of every block of a diffusers transformer, its inputs on the host with
    ``offload``."""
    model.enable_gradient_checkpointing(OffloadedCheckpoint() if offload else None)


def offloaded_checkpoint(model: torch.nn.Module) -> OffloadedCheckpoint | None:
    """The model's checkpoint function when it offloads, else None."""
    func = getattr(model, "_gradient_checkpointing_func", None)
    return func if isinstance(func, OffloadedCheckpoint) else None
