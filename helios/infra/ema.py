"""Sharded EMA (paper §4.2): each rank keeps only its 1/Z share of the fp32 EMA.

Every tensor is cut into Z chunks of ``ceil(numel / Z)`` elements (the last padded), the layout of
DeepSpeed ZeRO-3's parameter partitions, so rank r averages elements ``[r*c, (r+1)*c)``: under DDP or
ZeRO-2 it reads them from the full parameter, under ZeRO-3 from the rank's own partition (``ds_tensor``).
Updates are local (no communication); ``gather()`` is the one collective, used to save, validate or export.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ShardedEma:
    def __init__(self, params: dict[str, torch.Tensor], rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world = rank, world_size
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
        self.shard = {n: self._local(p, n).float().clone() for n, p in params.items()}

    def _bounds(self, name: str) -> tuple[int, int, int]:
        numel = math.prod(self.shapes[name])
        chunk = -(-numel // self.world)
        start = min(self.rank * chunk, numel)
        return start, min(start + chunk, numel), chunk

    def _local(self, p: torch.Tensor, name: str) -> torch.Tensor:
        start, end, _ = self._bounds(name)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition is exactly the chunk (plus padding)
            return p.ds_tensor.detach().reshape(-1)[: end - start]
        return p.detach().reshape(-1)[start:end]

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * param on this rank's chunks (local, no communication), as
        two fused multi-tensor ops instead of a Python loop of two kernels per tensor."""
        shards = [self.shard[name] for name in params]
        local = [
            self._local(p, name).to(s.device, torch.float32) for (name, p), s in zip(params.items(), shards)
        ]
        torch._foreach_mul_(shards, decay)
        torch._foreach_add_(shards, local, alpha=1.0 - decay)

    def local_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shard.values())

    def gather(self, dst: int | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The full fp32 EMA on ``device`` (collective: every rank calls it): on every rank (``dst=None``,
        one all-gather; validation writes it into each rank's generator) or on rank ``dst`` alone (one
        gather: a checkpoint, which the main rank writes; the others return ``{}``)."""
        names = sorted(self.shard)
        if self.world == 1 or not dist.is_initialized():
            return {n: self.shard[n].to(device, copy=True).reshape(self.shapes[n]) for n in names}
        chunks = [self._bounds(n)[2] for n in names]
        flat = torch.zeros(sum(chunks), dtype=torch.float32, device=self._comm_device())
        offset = 0
        for n, c in zip(names, chunks):
            s = self.shard[n]
            flat[offset : offset + s.numel()] = s.to(flat.device)
            offset += c
        receives = dst is None or self.rank == dst
        parts = [torch.empty_like(flat) for _ in range(self.world)] if receives else None
        if dst is None:
            dist.all_gather(parts, flat)
        else:
            dist.gather(flat, parts, dst=dst)
        if parts is None:
            return {}
        out, offset = {}, 0
        for n, c in zip(names, chunks):  # one tensor at a time: the host holds the EMA once
            numel = math.prod(self.shapes[n])
            full = torch.cat([p[offset : offset + c] for p in parts])[:numel]
            out[n] = full.to(device, copy=True).reshape(self.shapes[n])
            offset += c
        return out

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def load(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's chunks of a gathered EMA (e.g. from a checkpoint)."""
        missing = set(self.shard) - set(full)
        if missing:
            raise KeyError(f"EMA in the checkpoint lacks {sorted(missing)[:3]}...")
        for name in self.shard:
            start, end, _ = self._bounds(name)
            self.shard[name].copy_(full[name].reshape(-1)[start:end].to(self.shard[name].device))
