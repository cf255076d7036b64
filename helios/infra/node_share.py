"""Host buffers held once per node: the ranks of a node map the same pages of a file in ``/dev/shm``.

Frozen 14B bases are the same on every rank, so eight private copies per 8-GPU node become one: the
weights read at start-up (:meth:`NodeShare.state`: stage 3's two bases were 8 x 62.7 GiB per node while
the models were built) and the offload pool's buffers (427 GiB per node in stage-3 post). The node's
first rank creates each buffer and fills it, the others map it; the file is unlinked as soon as every rank
has mapped it, so its pages live exactly as long as some rank maps them and a job that dies leaves nothing
behind (except in the few seconds between creating and mapping).
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from helios.config.schema import ConfigError
from helios.infra.distributed import all_gather_objects, barrier, broadcast_object

SHARED_MEMORY = Path("/dev/shm")
KEY = "parallel.node_shared_weights"
ALIGN = 16  # bytes: every view in a buffer starts aligned for any dtype


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class NodeShare:
    """Collective (every rank calls :meth:`buffer` for the same names, in the same order): a buffer is created
    by its node's first rank and mapped by the node's others; in a job with one rank per node, it is plain
    host memory (every rank decides the same way)."""

    def __init__(self, directory: Path = SHARED_MEMORY) -> None:
        hosts = all_gather_objects(socket.gethostname())
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
        self.leader_rank = hosts.index(hosts[rank])  # the lowest rank on this host
        self.leader = self.leader_rank == rank
        self.shared = max(hosts.count(h) for h in hosts) > 1
        self.directory = directory
        self.prefix = f"helios-{broadcast_object(uuid.uuid4().hex)}"  # one name per job
        self._storages: set[int] = set()  # the buffers' storage pointers (:meth:`holds`)
        self._states = 0

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in one of this share's node-wide buffers (a write would reach every rank)."""
        return t.untyped_storage().data_ptr() in self._storages

    def state(self, load: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collective: ``load()``'s tensors, read by the node's first rank alone, as views of one node-wide
        buffer (each private tensor freed as soon as it is copied); the node's other ranks never read the
        source. The tensors are read-only for the run: a trainable parameter built on one must be copied
        first (:meth:`holds`)."""
        if not self.shared:
            return load()
        self._states += 1
        state = load() if self.leader else None
        layout, total = None, 0  # (key, shape, dtype, offset, bytes) per tensor, from the node's first rank
        if state is not None:
            layout = []
            for key, t in state.items():
                layout.append((key, tuple(t.shape), t.dtype, total, tensor_bytes(t)))
                total += aligned(tensor_bytes(t))
        layout, total = all_gather_objects((layout, total))[self.leader_rank]

        def views(flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
            for key, shape, dtype, offset, size in layout:
                yield key, flat[offset : offset + size].view(dtype).view(shape)

        def fill(flat: torch.Tensor) -> None:
            for key, view in views(flat):
                view.copy_(state.pop(key))  # the private copy freed as it goes

        flat = self.buffer(f"state{self._states}", total, fill)
        return dict(views(flat))

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
                f"is true, and {self.directory} has {free / 2**30:.1f} GiB free where {name!r} needs "
                f"{nbytes / 2**30:.1f} GiB to hold frozen weights once per node: enlarge it (a "
                "container's --shm-size) or set it false (one copy per rank)"
            )
        answers = all_gather_objects((problem, nbytes))
        problems = [p for p, _ in answers if p]
        if problems:
            raise ConfigError(KEY, problems[0])
        if len({n for _, n in answers}) > 1:  # the same frozen weights on every rank, or nothing to share
            raise RuntimeError(f"{name!r}: the frozen bytes differ across ranks: {[n for _, n in answers]}")
        if self.leader:
            flat = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
            fill(flat)
        barrier()  # filled
        if not self.leader:
            flat = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        barrier()  # mapped everywhere: the name is no longer needed
        if self.leader:
            path.unlink()
        self._storages.add(flat.untyped_storage().data_ptr())
        return flat


def node_shared_loader(share: NodeShare | None, load: Callable[..., dict]) -> Callable[..., dict]:
    """``load`` (any signature) with what it returns held once per node (:meth:`NodeShare.state`)."""
    if share is None:
        return load
    return lambda *args, **kwargs: share.state(lambda: load(*args, **kwargs))


def own_trainable(module: torch.nn.Module, share: NodeShare | None) -> None:
    """Each trainable parameter built on a node-wide buffer (e.g. the memory patches, trained in full from
    the loaded base) copied into this rank's own memory, so that its updates stay on this rank."""
    if share is None:
        return
    for p in module.parameters():
        if p.requires_grad and share.holds(p):
            p.data = p.data.clone()
