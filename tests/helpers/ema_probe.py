"""Under torchrun: a sharded EMA against an unsharded reference after N updates; writes per-rank JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist

from helios.infra.ema import ShardedEma


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """The unsharded reference: ema <- decay * ema + (1 - decay) * param, tensor by tensor."""
    for name, p in params.items():
        ema[name].mul_(decay).add_(p.detach().to(ema[name].dtype), alpha=1.0 - decay)


def local_bytes(ema: ShardedEma) -> int:
    """The bytes of this rank's EMA chunks."""
    return sum(s.numel() * s.element_size() for s in ema.shard.values())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)  # identical parameters on every rank, as under DDP
    params = {
        "a.weight": torch.randn(7, 5, generator=gen),
        "b.bias": torch.randn(3, generator=gen),
        "c.lora": torch.randn(4, 2, 3, generator=gen),
    }
    reference = {n: p.clone() for n, p in params.items()}
    ema = ShardedEma(params, rank, world)
    for step in range(int(sys.argv[2])):
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen))
        decay = min((1 + step) / (10 + step), 0.99)
        ema.update(params, decay)
        ema_update(reference, params, decay)
    full = ema.gather()
    diff = max(float((full[n] - reference[n]).abs().max()) for n in reference)
    fresh = ShardedEma(params, rank, world)
    fresh.load(full)
    reload_diff = max(float((fresh.shard[n] - ema.shard[n]).abs().max()) for n in ema.shard)
    to_main = ema.gather(dst=0)  # a checkpoint's gather: the main rank alone receives the EMA
    main_diff = max(float((to_main[n] - reference[n]).abs().max()) for n in reference) if to_main else None
    out = {
        "rank": rank,
        "main_keys": sorted(to_main),
        "main_diff": main_diff,
        "bytes": local_bytes(ema),
        "diff": diff,
        "reload_diff": reload_diff,
        "full_bytes": sum(p.numel() * 4 for p in params.values()),
    }
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
