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
