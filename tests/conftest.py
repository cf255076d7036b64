"""Shared fixtures: one synthetic-data cache per test session (subprocesses inherit HELIOS_CACHE)."""

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
    cache = tmp_path_factory.mktemp("helios-cache")
    os.environ["HELIOS_CACHE"] = str(cache)
    # one compute thread per test process (subprocesses inherit it): two xdist workers fill two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return cache


@pytest.fixture
def python() -> str:
    return sys.executable
