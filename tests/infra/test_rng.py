"""The run's random streams: the rank-shared stream is a function of (seed, step, micro-batch)."""

import torch

from helios.infra.rng import seed_everything, shared_generator


def _draw(seed: int, step: int, micro: int) -> list[int]:
    return torch.randint(1_000_000, (4,), generator=shared_generator(seed, step, micro)).tolist()


def test_shared_stream_is_reproducible_and_new_for_every_step_micro_batch_and_seed():
    """Every rank (and a resumed run) draws the same values for one (seed, step, micro); each step and
    micro-batch draws new ones, else every step would train the same pyramid stage and exit steps."""
    assert _draw(3, 7, 1) == _draw(3, 7, 1)
    by_step = {tuple(_draw(3, step, 0)) for step in range(50)}
    by_micro = {tuple(_draw(3, 7, micro)) for micro in range(16)}
    by_seed = {tuple(_draw(seed, 7, 0)) for seed in range(16)}
    assert (len(by_step), len(by_micro), len(by_seed)) == (50, 16, 16)


def test_a_ranks_gpu_streams_are_saved_and_restored_where_there_is_a_gpu(monkeypatch):
    """The CUDA generators' states travel with the rank's checkpoint file (a CPU stands in for the GPU)."""
    from helios.infra import rng

    restored = []
    monkeypatch.setattr(rng.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rng.torch.cuda, "get_rng_state_all", lambda: ["gpu0-state"])
    monkeypatch.setattr(rng.torch.cuda, "set_rng_state_all", restored.append)
    generator = torch.Generator().manual_seed(3)
    state = rng.rank_state(generator)
    assert state["cuda"] == ["gpu0-state"]
    rng.restore_rank_state(state, generator)
    assert restored == [["gpu0-state"]]
    # the same checkpoint resumed on a host without a GPU (an export or a CPU debug run): its GPU streams
    # are left alone, the others restored
    monkeypatch.setattr(rng.torch.cuda, "is_available", lambda: False)
    expected = torch.randn(3, generator=generator)
    rng.restore_rank_state(state, generator)
    assert restored == [["gpu0-state"]] and torch.equal(torch.randn(3, generator=generator), expected)


def test_shared_stream_seeds_are_pinned_across_versions():
    """A checkpoint resumed by a later version of the framework draws what the run would have drawn: the
    stream's seed for (seed, step, micro) is part of the checkpoint format, pinned here by value."""
    assert shared_generator(3, 7, 1).initial_seed() == (3 * 1_000_003 + 7) * 1024 + 1 == 3_072_016_385
    assert shared_generator(0, 0, 0).initial_seed() == 0


def test_seed_everything_seeds_pythons_numpys_and_torchs_global_streams():
    """The per-rank seed reaches all three global streams (what a stage or a library draws from outside
    the trainer's generators): the same seed gives the same draws, another seed others."""
    import random

    import numpy as np

    def draws(seed: int) -> tuple[float, float, float]:
        seed_everything(seed)
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seeded = torch.Generator().manual_seed(7)
    want = (
        random.Random(7).random(),
        float(np.random.RandomState(7).rand()),
        float(torch.rand((), generator=seeded)),
    )
    assert draws(7) == want
    assert all(a != b for a, b in zip(draws(7), draws(8), strict=True))
