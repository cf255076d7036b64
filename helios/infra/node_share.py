"""Host buffers held once per node: the ranks of a node map the same pages of a file in ``/dev/shm``.

The offload pool keeps every frozen 14B base in host memory; the bases are the same on every rank, so
eight private copies per 8-GPU node (427 GiB in stage-3 post) become one. The node's first rank creates
each buffer and fills it, the others map it; the file is unlinked as soon as every rank has mapped it,
so its pages live exactly as long as some rank maps them and a job that dies leaves nothing behind
(except in the few seconds between creating and mapping).
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from helios.config.schema import ConfigError
from helios.infra.distributed import all_gather_objects, barrier, broadcast_object

SHARED_MEMORY = Path("/dev/shm")


class NodeShare:
    """Collective (every rank calls :meth:`buffer` for the same names, in the same order): a buffer is created
    by its node's first rank and mapped by the node's others; in a job with one rank per node, it is plain
    host memory (every rank decides the same way)."""

    def __init__(self, directory: Path = SHARED_MEMORY) -> None:
        hosts = all_gather_objects(socket.gethostname())
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
        self.leader = hosts.index(hosts[rank]) == rank  # the lowest rank on this host
        self.shared = max(hosts.count(h) for h in hosts) > 1
        self.directory = directory
        self.prefix = f"helios-{broadcast_object(uuid.uuid4().hex)}"  # one name per job

    def buffer(self, name: str, nbytes: int, fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """``nbytes`` of host memory holding what ``fill`` writes into it (run once per node)."""
        if not self.shared or nbytes == 0:
            flat = torch.empty(nbytes, dtype=torch.uint8)
            fill(flat)
            return flat
        path = self.directory / f"{self.prefix}-{name}"
        problem = None
        free = shutil.disk_usage(self.directory).free if self.leader else nbytes
        if free < nbytes:
            problem = (
                f"is true, and {self.directory} has {free / 2**30:.1f} GiB free where role {name!r} needs "
                f"{nbytes / 2**30:.1f} GiB to hold its frozen weights once per node: enlarge it (a "
                "container's --shm-size) or set it false (one copy per rank)"
            )
        answers = all_gather_objects((problem, nbytes))
        problems = [p for p, _ in answers if p]
        if problems:
            raise ConfigError("distill.offload_shared", problems[0])
        if len({n for _, n in answers}) > 1:  # the same frozen weights on every rank, or nothing to share
            raise RuntimeError(f"role {name!r}'s frozen bytes differ across ranks: {[n for _, n in answers]}")
        if self.leader:
            flat = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
            fill(flat)
        barrier()  # filled
        if not self.leader:
            flat = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        barrier()  # mapped everywhere: the name is no longer needed
        if self.leader:
            path.unlink()
        return flat
