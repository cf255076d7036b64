"""Shared fixtures: one synthetic-data cache per test session (subprocesses inherit HELIOS_CACHE), or the one
named by ``HELIOS_TEST_CACHE`` for every session (tests/mutation.py: each mutant's test session would
otherwise make the synthetic set and the tiny stage-3 stand-ins again)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before they are defined.
if "TRITON_INTERPRET" not in os.environ:
    import shutil

    if not shutil.which("nvidia-smi"):
        os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]

# The longest test files first (their times from `pytest --durations=60`, 2026-12-06), the rest in collection
# order: the README's command hands whole files to two xdist workers in this order
# (`--dist loadfile --no-loadscope-reorder`; xdist's own reorder puts files with few tests last, and those
# are the long end-to-end ones). Only the wall time depends on this list (it gained little measurable: the
# suite took 37.9 min before this order and three faster tests, 36.3 min after).
LONGEST_FIRST = (
    "tests/trainer/test_tiny_long_video.py",
    "tests/stages/test_stage3.py",
    "tests/commands/test_memory.py",
    "tests/trainer/test_rehearsal.py",
    "tests/trainer/test_cluster.py",
    "tests/test_toy_experiment.py",
    "tests/infra/test_zero.py",
    "tests/infra/test_offload.py",
    "tests/trainer/test_training.py",
    "tests/commands/test_launch.py",
    "tests/model/test_kernels.py",
    "tests/infra/test_shard_optimizer.py",
    "tests/infra/test_grad_comm.py",
    "tests/commands/test_install.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session", autouse=True)
def helios_cache(tmp_path_factory) -> Path:
    shared = os.environ.get("HELIOS_TEST_CACHE")
    cache = Path(shared) if shared else tmp_path_factory.mktemp("helios-cache")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["HELIOS_CACHE"] = str(cache)
    # one compute thread per test process (subprocesses inherit it): two xdist workers fill two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return cache


@pytest.fixture(autouse=True)
def plain_linear():
    """Every test starts with torch's own ``F.linear``: a ZeRO-3 engine built in the test process replaces it
    with DeepSpeed's memory-efficient one for the rest of the process ("this will persist unless manually
    reset"), and a later test (torch's FLOP count of the DiT) would see other operators."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.fixture
def python() -> str:
    return sys.executable
