"""Random streams of a training run: the global seed, and the streams every rank shares."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shared_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The same random stream on every rank for one micro-batch: for draws that decide how many forward
    passes a step makes (the pyramid stage of each sample, stage 3's exit step), which must agree across
    ranks under ZeRO-3 (every forward gathers parameters collectively). A function of (seed, step, micro),
    so a resumed run draws what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + micro)


def rank_state(generator: torch.Generator) -> dict:
    """This rank's random streams, for its checkpoint file."""
    state = {
        "generator": generator.get_state(),
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_state(state: dict, generator: torch.Generator) -> None:
    """Continue this rank's random streams where the checkpoint left them."""
    generator.set_state(state["generator"])
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
