"""Under torchrun: two ranks read a state once per node and build the offload pool with node-shared host
buffers; each writes what it sees (values, the mapped files' inodes, what is left in the directory, values
the other rank wrote, how often it read the state itself)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from helios.infra.node_share import NodeShare, node_shared_loader, own_trainable
from helios.infra.offload import OffloadPool


def mapped_inode(address: int) -> int | None:
    """The inode of the file mapping that holds ``address`` (/proc/self/maps), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return int(fields[4]) or None
    return None


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(sys.argv[1])
    directory = out / "shm"
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # the same frozen weights on every rank, as a stage-3 base
    roles = {"generator": nn.Linear(64, 32), "critic": nn.Linear(16, 8, bias=False)}
    expected = {n: [p.detach().clone() for p in m.parameters()] for n, m in roles.items()}
    for module in roles.values():
        module.requires_grad_(False)
    share = NodeShare(directory)
    reads = []

    def read(seed: int) -> dict[str, torch.Tensor]:  # a checkpoint's weights, as a rank would read them
        reads.append(seed)
        return nn.Linear(6, 4).state_dict()

    torch.manual_seed(1)
    state = node_shared_loader(share, read)(1)
    torch.manual_seed(1)
    state_equal = all(torch.equal(state[k], v) for k, v in nn.Linear(6, 4).state_dict().items())
    layer = nn.Linear(6, 4)
    layer.load_state_dict(state, assign=True)  # its weights are the shared tensors themselves
    layer.bias.requires_grad_(False)  # frozen: stays shared; the weight trains: this rank's own copy
    own_trainable(layer, share)
    pool = OffloadPool(roles, torch.device("cpu"), share)
    equal = all(torch.equal(h, e) for n in roles for h, e in zip(pool.host[n], expected[n]))  # released
    inodes = {n: mapped_inode(pool.buffers[n].data_ptr()) for n in roles}
    dist.barrier()
    left = sorted(os.listdir(directory))
    inodes["state"] = mapped_inode(state["bias"].data_ptr())
    inodes["trainable"] = mapped_inode(layer.weight.data_ptr())
    if rank == 0:  # one node's memory: a write on rank 0 is what rank 1 reads, but not to a trainable weight
        pool.host["generator"][0][0, 0] = 123.0
        with torch.no_grad():
            layer.weight[0, 0] = 7.0
    dist.barrier()
    seen = float(pool.host["generator"][0][0, 0])
    report = {"equal": equal and state_equal, "inodes": inodes, "left": left, "seen": seen, "reads": reads}
    report["trainable_seen"] = float(layer.weight[0, 0])
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
