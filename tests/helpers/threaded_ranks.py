"""Ranks as threads of this process, on torch's threaded process group: a collective's code (which rank
sends, which receives, what each assembles) runs where a test's mutants are active, which spawned ranks
never are (mutation testing activates a mutant in its own process only). The 2-process tests check the real
gloo collectives; these check the code around them with ranks that hold different values."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.testing._internal.distributed import multi_threaded_pg

T = TypeVar("T")


def run_ranks(world: int, fn: Callable[[int], T], timeout: float = 20.0) -> list[T]:
    """``fn(rank)`` on ``world`` ranks at once (threads sharing one process group); each rank's result, or
    the first rank's exception (a rank that fails wakes the others waiting in a collective)."""
    results: dict[int, T] = {}
    errors: dict[int, BaseException] = {}
    store = dist.HashStore()

    def rank_main(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
        try:
            results[rank] = fn(rank)
        except BaseException as err:  # handed to the caller below
            errors[rank] = err
            multi_threaded_pg.ProcessLocalGroup.exception_handle(err)
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    multi_threaded_pg._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        stuck = [r for r, thread in enumerate(threads) if thread.is_alive()]
    finally:
        multi_threaded_pg.ProcessLocalGroup.reset()
        multi_threaded_pg._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[min(errors)]
    if stuck:
        raise TimeoutError(f"ranks {stuck} still waiting after {timeout} s (a collective some rank skipped)")
    return [results[r] for r in range(world)]
