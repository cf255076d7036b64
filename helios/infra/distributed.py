"""Process-group setup for torchrun / srun, and small collective helpers."""

from __future__ import annotations

import datetime
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from helios.config.schema import ParallelConfig, TrainerConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for a process started by ``srun`` without torchrun (one task per
    GPU): rank/world/local rank from the Slurm task ids, the master on the job's first node."""
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list (``gpu[001-004,007]`` -> ``gpu001``), via scontrol when present."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    head, _, rest = nodelist.partition("[")
    if not rest:
        return nodelist.split(",")[0]
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return head + first


def setup(parallel: ParallelConfig, trainer: TrainerConfig) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's (or Slurm's) environment when world > 1.

    gloo on CPU, NCCL on CUDA (``parallel.dist_backend`` overrides).
    """
    os.environ.update(slurm_env(dict(os.environ)))
    world = _env_int("WORLD_SIZE", default=1)
    rank = _env_int("RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", default=0)
    use_cuda = trainer.device == "cuda" or (trainer.device == "auto" and torch.cuda.is_available())
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # DeepSpeed (parallel=zero2|zero3) needs a process group even for one process
    if (world > 1 or parallel.backend != "ddp") and not dist.is_initialized():
        backend = (
            parallel.dist_backend if parallel.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
        )
        # one process: a private rendezvous; only LOCAL_RANK (DeepSpeed reads it) goes to the environment,
        # which child processes inherit (a WORLD_SIZE there would hide srun's own)
        os.environ.setdefault("LOCAL_RANK", "0")
        single = {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
        timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
        dist.init_process_group(backend=backend, timeout=timeout, **(single if world == 1 else {}))
        if backend != "gloo":
            global _HOST_GROUP
            _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def free_port() -> int:
    """A free TCP port on this host (for a one-process rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a gloo group beside the NCCL default group, for host-side agreements (None: the default group is gloo)
_HOST_GROUP: dist.ProcessGroup | None = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_every_rank(flag: bool) -> bool:
    """True when the host-side ``flag`` holds on every rank: for decisions that set how many forward
    passes a step makes, which must agree across ranks (ZeRO-3 gathers weights in every forward). One
    all-reduce over gloo on the host: the device is not waited for."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_HOST_GROUP)
    return bool(t.item() > 0)


def agree_max(values: list[int]) -> list[int]:
    """The elementwise maximum of a host-side integer list over the ranks (one all-reduce over gloo on the
    host: the device is not waited for); ``values`` has the same length on every rank."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return [int(v) for v in t.tolist()]


def host_max(values: list[float]) -> list[float]:
    """The elementwise maximum of host-side numbers over the ranks (e.g. each rank's peak memory); one
    all-reduce over gloo on the host."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return t.tolist()


def all_mean(
    values: dict[str, float | torch.Tensor], device: torch.device, keys: list[str] | None = None
) -> dict[str, float]:
    """Mean over ranks of scalar metrics (floats or device scalars), ignoring non-finite values (a
    metric a rank did not see this step): one all-reduce and one host copy.

    ``keys`` must be the same list on every rank; missing values count as absent.
    """
    keys = sorted(values) if keys is None else keys
    if not keys:
        return {}
    v = torch.stack(
        [torch.as_tensor(values.get(k, math.nan), dtype=torch.float64).to(device).reshape(()) for k in keys]
    )
    seen = torch.isfinite(v)
    t = torch.stack([torch.where(seen, v, torch.zeros_like(v)), seen.double()])
    if dist.is_initialized():
        dist.all_reduce(t)
    sums, counts = t.tolist()
    return {k: (s / c if c > 0 else math.nan) for k, s, c in zip(keys, sums, counts)}


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def teardown() -> None:
    global _HOST_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the host group too
    _HOST_GROUP = None
    # DeepSpeed keeps its clone of the world group across engines; destroyed with the groups above, it
    # would fail the next run's engines in this process (a second training in one Python process)
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None
