"""Async VRAM offload of idle roles (paper §4.2).

The frozen weights of every role live in (pinned) host memory; ``activate(*roles)`` makes exactly those
roles resident on the device and releases the others, and ``prefetch(role)`` starts the next role's
host-to-device copy on a side CUDA stream so that it overlaps the current role's compute. Only frozen
parameters move (the 14B bases): trainable weights (LoRA, heads) and their optimiser state stay on the
device, so an offload never needs a copy back and the optimiser never sees a moved tensor.

A stage uses the pool through placement blocks (``DistillRoles.resident``): ``activate`` on entry,
:meth:`OffloadPool.leave` on exit. A frozen weight used by a graph that is still waiting for its backward
may be released meanwhile: the backward runs inside a block that makes it resident again (same values).
With gradient checkpointing (every 14B config) the blocks' forward is recomputed then, from the parameter
as it is at that time, so the release frees the device copy meanwhile; without it, what autograd saved (a
linear layer saves a view of its weight) keeps the device copy alive until the backward, and releasing that
role frees nothing.

On a CPU run (tests, rehearsals) host and device are one memory, so nothing would show a role used while
it is not resident: there a released weight is an empty tensor (the values stay in the host copy) and a
block's roles are released as it ends, so that a forward or backward outside its block fails, as a wrong
placement would on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from helios.infra.node_share import NodeShare, aligned, tensor_bytes


class OffloadPool:
    """``share``: the host buffers once per node (:class:`NodeShare`, collective); None: one per rank."""

    def __init__(
        self, roles: dict[str, nn.Module], device: torch.device, share: NodeShare | None = None
    ) -> None:
        self.device = torch.device(device)
        self.share = share
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.params: dict[str, list[nn.Parameter]] = {}
        self.host: dict[str, list[torch.Tensor]] = {}
        self.pending: dict[str, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.resident: set[str] = set()
        self.moved_bytes = 0  # host -> device traffic, for the benchmark
        self.buffers: dict[str, torch.Tensor] = {}  # one exact-size host allocation per role
        self._registered: list[int] = []  # data pointers page-locked with cudaHostRegister
        seen: set[int] = set()
        for name, module in roles.items():
            if module is None:
                continue
            params = [p for p in module.parameters() if not p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            self.params[name] = params
            self.host[name] = self._to_host(name, params)  # starts offloaded: nothing on the device yet

    def _to_host(self, name: str, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The role's frozen tensors copied into one host buffer of exactly their size (16-byte aligned
        views), page-locked in place with ``cudaHostRegister`` on a CUDA machine: pinned tensors from
        torch's caching host allocator are rounded up to a power of two each, up to twice the bytes."""
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += aligned(tensor_bytes(p))

        def views(flat: torch.Tensor) -> list[torch.Tensor]:
            return [
                flat[start : start + tensor_bytes(p)].view(p.dtype).view(p.shape)
                for p, start in zip(params, offsets)
            ]

        def fill(flat: torch.Tensor) -> None:
            for view, p in zip(views(flat), params):
                view.copy_(p.data)
                p.data = view  # the original is freed now (when nothing else holds it), not after the role

        if self.share is not None:  # filled once per node, mapped by the node's other ranks
            flat = self.share.buffer(name, total, fill)
        else:
            flat = torch.empty(total, dtype=torch.uint8)
            fill(flat)
        if self.cuda and total:
            err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), total, 1)  # portable, as torch.cuda
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {total} bytes for role {name!r} failed: {err}")
            self._registered.append(flat.data_ptr())
        self.buffers[name] = flat
        host = views(flat)
        for p, view in zip(params, host):
            p.data = self._released(view)  # the ranks that mapped the node's buffer drop their own copy here
        return host

    def _released(self, host: torch.Tensor) -> torch.Tensor:
        """What a released weight points at: its host copy (the device cannot read it without a copy); on
        a CPU, where the host copy is device memory too, an empty tensor (module docstring)."""
        return host if self.device.type != "cpu" else host.new_empty(0)

    def close(self) -> None:
        """Unpin the host buffers (their memory is freed with the pool)."""
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()

    def role_bytes(self, name: str) -> int:
        return sum(tensor_bytes(h) for h in self.host[name])

    def prefetch(self, name: str) -> None:
        """Start copying ``name``'s frozen weights to the device (non-blocking, side stream)."""
        if name not in self.params or name in self.resident or name in self.pending:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for h in self.host[name]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:  # CPU runs (tests): a separate copy stands in for device memory
            copies, event = [h.clone() for h in self.host[name]], None
        self.moved_bytes += self.role_bytes(name)
        self.pending[name] = (copies, event)

    def activate(self, *names: str, prefetch: str | None = None) -> None:
        """Exactly ``names`` resident afterwards (others released to host); then prefetch ``prefetch``."""
        for name in list(self.resident):
            if name not in names:
                for p, h in zip(self.params[name], self.host[name]):
                    p.data = self._released(h)  # frozen: the host copy is current, nothing to copy back
                self.resident.discard(name)
        for name in names:
            if name not in self.params or name in self.resident:
                continue
            self.prefetch(name)
            copies, event = self.pending.pop(name)
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for c in copies:
                    c.record_stream(current)  # allocated on the side stream, used and freed on this one
            for p, c in zip(self.params[name], copies):
                p.data = c
            self.resident.add(name)
        if prefetch is not None:
            self.prefetch(prefetch)

    def leave(self) -> None:
        """A placement block is over. On a GPU its roles stay resident until the next block, which
        releases what it does not use (no transfer between blocks that share a role); on a CPU they are
        released now, so that a computation outside its block fails there too (module docstring)."""
        if self.device.type == "cpu":
            self.activate()

    def restore(self) -> None:
        """Every frozen weight back where the pool holds it (resident roles on the device, the others in
        host memory): after something moved the modules themselves (DeepSpeed's initialize moves a
        role's module to the device; copies it left behind are freed)."""
        for name, params in self.params.items():
            if name not in self.resident:
                for p, h in zip(params, self.host[name]):
                    p.data = self._released(h)
