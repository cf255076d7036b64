"""ShardedEma's gather in one process: a stand-in all-gather hands each rank the others' flat chunks, so the
assembly of the full EMA (chunk order, padding, names) is checked without spawning ranks (the 2-process test
in tests/core/test_distill.py checks the real collective)."""

from types import SimpleNamespace

import pytest
import torch

from helios.infra import ema as ema_module
from helios.infra.ema import ShardedEma


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # sizes that do not divide by the world size: padded chunks
    return {"b.weight": torch.randn(5, 3, generator=gen), "a.bias": torch.randn(7, generator=gen)}


def test_gather_assembles_every_ranks_chunks_into_the_plain_ema(monkeypatch):
    world, decay = 3, 0.9
    plain = ShardedEma(_params(0))
    ranks = [ShardedEma(_params(0), rank=r, world_size=world) for r in range(world)]
    for ema in (plain, *ranks):
        ema.update(_params(1), decay)
    assert [r.shard["a.bias"].numel() for r in ranks] == [3, 3, 1]

    flats: dict[int, torch.Tensor] = {}

    def all_gather(parts: list[torch.Tensor], flat: torch.Tensor) -> None:
        flats[len(flats)] = flat.clone()
        for i, part in enumerate(parts):
            part.copy_(sent[i] if sent else torch.full_like(part, float("nan")))

    sent: list[torch.Tensor] = []
    fake = SimpleNamespace(is_initialized=lambda: True, get_backend=lambda: "gloo", all_gather=all_gather)
    monkeypatch.setattr(ema_module, "dist", fake)
    for ema in ranks:  # first pass: what each rank sends
        ema.gather()
    sent = [flats[r] for r in range(world)]
    expected = plain.gather()
    for ema in ranks:
        gathered = ema.gather()
        assert gathered.keys() == expected.keys()
        for name, value in expected.items():
            assert gathered[name].shape == value.shape
            torch.testing.assert_close(gathered[name], value, rtol=0, atol=0)
    # gathered where it is written (validation: the generator's device; meta makes the placement visible)
    assert {v.device.type for v in ranks[0].gather(device="meta").values()} == {"meta"}


def test_a_zero3_parameter_is_read_from_its_own_partition():
    """Under ZeRO-3 a parameter holds no data of its own: this rank's chunk is its partition (``ds_tensor``,
    padded to the chunk size), which the EMA reads instead."""
    ema = ShardedEma({"w": torch.arange(5.0)}, rank=1, world_size=2)  # chunks of 3: rank 1 holds 3, 4
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_tensor = torch.tensor([13.0, 14.0, 0.0])  # the partition and its padding
    ema.update({"w": partitioned}, decay=0.0)
    assert ema.shard["w"].tolist() == [13.0, 14.0]


def test_the_gather_goes_through_the_process_groups_device(monkeypatch):
    """NCCL gathers GPU tensors: the flat buffer is made on the group's device (``cuda:<current>`` under
    NCCL, the CPU under gloo); a meta device stands in for the GPU here."""
    ema = ShardedEma(_params(0), rank=0, world_size=2)
    nccl = SimpleNamespace(is_initialized=lambda: True, get_backend=lambda: "nccl")
    monkeypatch.setattr(ema_module, "dist", nccl)
    monkeypatch.setattr(ema_module.torch.cuda, "current_device", lambda: 3)
    assert ema._comm_device() == torch.device("cuda", 3)

    sent: list[torch.device] = []

    class Sent(Exception):
        pass

    def all_gather(parts: list[torch.Tensor], flat: torch.Tensor) -> None:
        sent.append(flat.device)
        raise Sent

    fake = SimpleNamespace(is_initialized=lambda: True, get_backend=lambda: "nccl", all_gather=all_gather)
    monkeypatch.setattr(ema_module, "dist", fake)
    monkeypatch.setattr(ShardedEma, "_comm_device", lambda self: torch.device("meta"))
    with pytest.raises(Sent):
        ema.gather()
    assert sent == [torch.device("meta")]
