"""The trainer's EMA component (ModelEma: start, TTUR, validation swap, checkpoint) and ShardedEma's gather
in one process: a stand-in all-gather hands each rank the others' flat chunks, so the assembly of the full EMA
(chunk order, padding, names) is checked without spawning ranks (the 2-process test in
tests/core/test_distill.py checks the real collective)."""

from types import SimpleNamespace

import pytest
import torch

from helios.core.distillation import EmaSchedule
from helios.infra import ema as ema_module
from helios.infra.ema import ModelEma, ShardedEma
from helios.infra.model_roles import Role


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


def _generator_ema(module: torch.nn.Module, start: int = 2) -> ModelEma:
    params = list(module.parameters())
    return ModelEma([Role("generator", module, params, 1e-4, ema=EmaSchedule(0.99, start))])


def test_putting_the_training_weights_back_without_an_ema_written_changes_nothing():
    """A validation before the first EMA copy writes nothing and puts nothing back."""
    m = torch.nn.Linear(2, 2)
    ema = _generator_ema(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.swapped_in():  # no average yet: nothing is written
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_the_ema_is_written_in_for_validation_and_the_training_weights_put_back_also_on_failure():
    m = torch.nn.Linear(2, 2)
    ema = _generator_ema(m, start=1)
    ema.after_step(1, ["generator"])  # the copy
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.after_step(2, ["generator"])  # decay min(2/11, 0.99): ema = 2/11 copy + 9/11 (copy + 1)
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="sampling failed"), ema.swapped_in():
        assert torch.allclose(m.weight, trained["weight"] + 9 / 11) and torch.equal(m.bias, raw["bias"])
        raise RuntimeError("sampling failed")
    assert all(torch.equal(raw[k], v) for k, v in m.state_dict().items())


def test_the_ema_starts_at_its_step_and_averages_after_generator_updates_only():
    """``distill.ema_start``: the EMA is a copy of the generator at the first generator update from that
    step on, then averages after each generator update; a critic-only iteration (TTUR) leaves it alone."""
    ema = _generator_ema(torch.nn.Linear(2, 2))
    ema.after_step(1, ["generator", "critic"])  # before its start
    ema.after_step(2, ["critic"])  # a critic-only iteration
    assert ema.average == {}
    ema.after_step(2, ["generator", "critic"])
    assert list(ema.average) == ["generator"] and ema.updates == {"generator": 0}
    ema.after_step(3, ["critic"])
    assert ema.updates == {"generator": 0}
    ema.after_step(4, ["generator"])
    assert ema.updates == {"generator": 1}


def test_a_checkpoint_before_the_ema_starts_holds_no_ema():
    m = torch.nn.Linear(2, 2)
    ema = _generator_ema(m)
    assert ema.tensors() == {} and ema.state_dict() == {"updates": {"generator": 0}}  # a count from the start
    ema.after_step(2, ["generator"])
    saved = ema.tensors()
    assert list(saved) == ["ema"] and sorted(saved["ema"]) == ["generator.bias", "generator.weight"]
    resumed = _generator_ema(m)
    resumed.load_tensors(saved)
    assert all(torch.equal(resumed.average["generator"].gather()[n], v) for n, v in saved["ema"].items())
    resumed.load_tensors({})  # a checkpoint without an EMA: none started
    assert resumed.average == {}


def test_the_update_count_resumes_also_from_a_checkpoint_that_kept_it_with_the_stage():
    """Checkpoints written before the EMA was the trainer's component kept the generator's count under
    ``stage.ema_updates``; both layouts resume it."""
    ema = _generator_ema(torch.nn.Linear(2, 2))
    ema.load_state_dict({"ema": {"updates": {"generator": 7}}, "step": 9})
    assert ema.state_dict() == {"updates": {"generator": 7}}
    ema.load_state_dict({"stage": {"ema_updates": 4}, "step": 9})
    assert ema.state_dict() == {"updates": {"generator": 4}}


def test_a_role_without_an_ema_schedule_has_none():
    m = torch.nn.Linear(2, 2)
    ema = ModelEma([Role("model", m, list(m.parameters()), 1e-4)])
    ema.after_step(5, ["model"])
    assert ema.average == {} and ema.tensors() == {} and ema.state_dict() == {"updates": {}}


def test_sampling_with_ema_weights_copies_the_module_and_leaves_the_training_weights():
    """Export and generate (``weights=ema``): a copy of the role holding the EMA; the module itself keeps its
    training weights."""
    from helios.infra.ema import with_ema

    m = torch.nn.Linear(2, 2)
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    ema = {"generator.weight": torch.full((2, 2), 7.0), "generator.bias": torch.full((2,), 7.0)}
    sampled = with_ema(m, "generator", ema)
    assert sampled is not m and all(torch.equal(p, torch.full_like(p, 7.0)) for p in sampled.parameters())
    assert all(torch.equal(trained[k], v) for k, v in m.state_dict().items())
    assert with_ema(m, "generator", None) is m and with_ema(m, "generator", {}) is m


def test_a_model_is_partitioned_when_zero3_gave_its_parameters_partitions():
    """``write_weights`` gathers a ZeRO-3 model (parameters that carry ``ds_tensor``) before writing it."""
    from helios.infra.ema import partitioned

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert not partitioned(model)
    model[1].bias.ds_tensor = torch.zeros(1)  # one partitioned parameter is enough
    assert partitioned(model)
