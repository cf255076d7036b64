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
from tests.helpers.threaded_ranks import run_ranks


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


def _rank_params(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s weights: ``_params(0)`` + 1000 * rank, so a chunk taken from the wrong rank shows."""
    return {n: t + 1000.0 * rank for n, t in _params(0).items()}


def _assembled(world: int) -> dict[str, torch.Tensor]:
    """Gathered over ``world`` ranks holding ``_rank_params``: each chunk from the rank that owns it."""
    out = {}
    for name, tensor in _params(0).items():
        flat, chunk = tensor.reshape(-1).clone(), -(-tensor.numel() // world)
        for rank in range(world):
            flat[rank * chunk : (rank + 1) * chunk] += 1000.0 * rank
        out[name] = flat.reshape(tensor.shape)
    return out


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_ranks_that_hold_different_weights_gather_each_ones_own_chunks_to_one_rank_or_to_all():
    """Three ranks (threads on one process group) whose weights differ: the gathered EMA takes every chunk
    from the rank that averages it; to rank ``dst`` alone (a checkpoint: the others get nothing) or to every
    rank (validation), where it is asked for (meta makes the placement visible)."""
    world = 3

    def rank_main(rank: int):
        ema = ShardedEma(_rank_params(rank), rank, world)
        return ema.gather(dst=1), ema.gather(), ema.gather(device="meta")

    results = run_ranks(world, rank_main)
    expected = _assembled(world)
    assert results[0][0] == {} and results[2][0] == {}
    _assert_same(results[1][0], expected)
    for _, to_all, on_meta in results:
        _assert_same(to_all, expected)
        assert {v.device.type for v in on_meta.values()} == {"meta"}


def test_the_gathered_ema_is_fp32_whatever_the_default_dtype():
    """The average is kept and gathered in fp32 also where a notebook made float64 (or bf16) the default."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gathered = run_ranks(2, lambda rank: ShardedEma(_rank_params(rank), rank, 2).gather())
    finally:
        torch.set_default_dtype(default)
    assert {v.dtype for g in gathered for v in g.values()} == {torch.float32}


def test_a_sharded_ema_is_checkpointed_from_the_main_rank_and_swapped_in_on_every_rank():
    """``ModelEma`` over two ranks (``ema_sharded``): the checkpoint's EMA is gathered on the main rank, which
    writes it (the other rank has nothing to write); validation writes the same gathered EMA into every rank's
    generator and puts each rank's own training weights back."""
    world = 2

    def rank_main(rank: int):
        module = torch.nn.Linear(5, 3)
        with torch.no_grad():  # the first copy: this rank's weights
            module.weight.copy_(_rank_params(rank)["b.weight"].T)
            module.bias.copy_(_rank_params(rank)["a.bias"][:3])
        role = Role(
            "generator", module, list(module.parameters()), 1e-4, ema=EmaSchedule(0.9, 1), ema_sharded=True
        )
        ema = ModelEma([role], rank, world)
        ema.after_step(1, ["generator"])
        raw = {n: p.detach().clone() for n, p in module.named_parameters()}
        with ema.swapped_in():
            swapped = {n: p.detach().clone() for n, p in module.named_parameters()}
        after = {n: p.detach().clone() for n, p in module.named_parameters()}
        return ema.tensors(), swapped, raw, after

    results = run_ranks(world, rank_main)
    assert results[1][0] == {} and list(results[0][0]) == ["ema"]
    saved = results[0][0]["ema"]
    for rank, (_, swapped, raw, after) in enumerate(results):
        _assert_same(after, raw)
        assert torch.equal(swapped["weight"], saved["generator.weight"])
        assert torch.equal(swapped["bias"], saved["generator.bias"])
        # each chunk of the flattened weight from the rank that averages it (chunks of 8 of 15)
        flat = saved["generator.weight"].reshape(-1)
        own = _rank_params(rank)["b.weight"].T.reshape(-1)
        assert torch.equal(flat[rank * 8 : (rank + 1) * 8], own[rank * 8 : (rank + 1) * 8])


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


@pytest.fixture
def zero3_partitions(tmp_path, monkeypatch):
    """A one-rank process group in which ``deepspeed.zero.Init`` partitions new modules as ZeRO-3 does."""
    import deepspeed
    import torch.distributed as dist

    from helios.infra.distributed import teardown

    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    try:
        yield lambda: deepspeed.zero.Init(config_dict_or_path=config)
    finally:
        teardown()


def test_weights_written_into_a_zero3_model_stay_and_the_old_ones_come_back(zero3_partitions):
    """Validation under ZeRO-3 writes the EMA into partitioned parameters (they hold no data outside a
    gather): written inside a gather whose changes are kept, returned as the full values they replaced."""
    import deepspeed

    from helios.infra.ema import partitioned, write_weights

    with zero3_partitions():
        module = torch.nn.Linear(4, 3)
    assert partitioned(module) and module.weight.numel() == 0
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        trained = {n: p.detach().clone() for n, p in module.named_parameters()}
    old = write_weights(
        module, "generator", {"generator.weight": torch.ones(3, 4), "generator.bias": torch.ones(3)}
    )
    _assert_same(old, {f"generator.{n}": v for n, v in trained.items()})
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        assert all(torch.equal(p, torch.ones_like(p)) for p in module.parameters())
    assert module.weight.numel() == 0  # partitioned again


def test_an_ema_missing_from_the_checkpoint_is_named():
    """A checkpoint whose EMA lacks some of the role's weights (another model, a changed LoRA) names the
    first three it lacks instead of loading a partial average."""
    names = ["d", "c", "b", "a"]
    ema = ShardedEma({n: torch.zeros(2) for n in names})
    with pytest.raises(KeyError, match=r"EMA in the checkpoint lacks \['a', 'b', 'c'\]\.\.\."):
        ema.load({})
    ema.load({n: torch.full((2,), 3.0) for n in names})
    assert all(torch.equal(s, torch.full((2,), 3.0)) for s in ema.shard.values())
