"""The EMA of a role's trainable weights (paper §3.4, Table 2: the generator's) as one trainer-level
component (:class:`ModelEma`: started, updated, swapped in for validation, checkpointed), kept sharded
(:class:`ShardedEma`, paper §4.2): each rank keeps only its 1/Z share of the fp32 EMA.

Every tensor is cut into Z chunks of ``ceil(numel / Z)`` elements (the last padded), the layout of
DeepSpeed ZeRO-3's parameter partitions, so rank r averages elements ``[r*c, (r+1)*c)``: under DDP or
ZeRO-2 it reads them from the full parameter, under ZeRO-3 from the rank's own partition (``ds_tensor``).
Updates are local (no communication); ``gather()`` is the one collective, used to save, validate or export.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from helios.infra.model_roles import Role


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
            flat[offset : offset + s.numel()] = s  # copies across devices (NCCL's buffer: the GPU)
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
            self.shard[name].copy_(full[name].reshape(-1)[start:end])  # copy_ crosses devices and dtypes


def trainable_params(role: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """What an EMA averages: ``module``'s trainable parameters, named as in the checkpoint (``role.name``)."""
    return {f"{role}.{n}": p for n, p in module.named_parameters() if p.requires_grad}


def partitioned(module: nn.Module) -> bool:
    """ZeRO-3 holds the module's parameters partitioned across ranks."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def with_ema(module: nn.Module, role: str, ema: dict[str, torch.Tensor] | None) -> nn.Module:
    """``module`` (the role ``role``), or with ``ema`` (export, generate) a copy holding the EMA weights."""
    if not ema or partitioned(module):
        return module
    module = copy.deepcopy(module)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in ema.items():
            key = name.removeprefix(f"{role}.")
            if key in params:
                params[key].copy_(tensor)
    return module


def write_weights(module: nn.Module, role: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``weights`` into ``module``'s trainable parameters (ZeRO-3: gathered, collective); returns the
    values it replaced, on the host."""
    params = {n: p for n, p in trainable_params(role, module).items() if n in weights}
    gathered = contextlib.nullcontext()
    if partitioned(module):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with gathered:
        old = {n: p.detach().cpu().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n].to(p.device, p.dtype))
    return old


class ModelEma:
    """The EMA of every role that declares one (:attr:`Role.ema`; stage 3: the generator), its whole life:
    a copy of the role's trainable weights at its schedule's start, an average after each of the role's
    optimizer steps (the warm-up's n counts these updates), the average written into the role in place
    while validation samples it (:meth:`swapped_in`), saved with the checkpoint and restored from it.
    Sharded over ranks (``Role.ema_sharded``: each rank averages its 1/Z share), else a full copy per rank."""

    GROUP = "ema"  # the checkpoint's tensor group

    def __init__(self, roles: list[Role], rank: int = 0, world_size: int = 1) -> None:
        self.roles = {r.name: r for r in roles if r.ema is not None}
        self.ranks = {name: (rank, world_size) if r.ema_sharded else (0, 1) for name, r in self.roles.items()}
        self.average: dict[str, ShardedEma] = {}
        self.updates = dict.fromkeys(self.roles, 0)  # averaging updates since the first copy
        self._raw: dict[str, dict[str, torch.Tensor]] = {}  # the training weights while validation runs

    def _params(self, name: str) -> dict[str, torch.Tensor]:
        return trainable_params(name, self.roles[name].module)

    def after_step(self, step: int, stepped: list[str]) -> None:
        """After optimizer step ``step`` (1-based count of updates) updated the roles ``stepped``."""
        for name, role in self.roles.items():
            if name not in stepped or not role.ema.active(step):
                continue
            params = self._params(name)
            if name not in self.average:
                self.average[name] = ShardedEma(params, *self.ranks[name])
                self.updates[name] = 0
            else:
                self.updates[name] += 1
                self.average[name].update(params, role.ema(self.updates[name]))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Collective: the gathered EMA written into its roles on every rank (their trainable weights only,
        the training values kept on the host meanwhile), so validation never copies a 14B base; the training
        weights are put back after the block, also when it fails."""
        try:
            for name, average in self.average.items():
                # gathered where it is written (the trainable weights' device; frozen ones may be offloaded)
                device = next(iter(self._params(name).values())).device
                self._raw[name] = write_weights(self.roles[name].module, name, average.gather(device=device))
            yield
        finally:
            for name, raw in self._raw.items():
                write_weights(self.roles[name].module, name, raw)
            self._raw = {}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: every EMA gathered for the checkpoint, on the main rank (which writes it)."""
        full = {n: t for average in self.average.values() for n, t in average.gather(dst=0).items()}
        return {self.GROUP: full} if full else {}

    def load_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """The EMA of a checkpoint (none there: none started yet)."""
        full = tensors.get(self.GROUP, {})
        self.average = {}
        for name in self.roles:
            own = {n: t for n, t in full.items() if n.startswith(f"{name}.")}
            if own:
                self.average[name] = ShardedEma(self._params(name), *self.ranks[name])
                self.average[name].load(own)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": dict(self.updates)}

    def load_state_dict(self, objects: dict[str, Any]) -> None:
        """The update counts from a checkpoint's objects (checkpoints before the EMA was the trainer's kept
        the generator's count with the stage: ``stage.ema_updates``)."""
        if "ema" in objects:
            self.updates.update(objects["ema"]["updates"])
        elif "generator" in self.updates:
            self.updates["generator"] = int(objects.get("stage", {}).get("ema_updates", 0))
