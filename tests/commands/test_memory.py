"""python -m helios.memory: counts equal the built models, activations against hand-counted tokens, the
offload schedule against a real step, the command's last line."""

import re

import pytest
import torch

from helios import memory as memory_command
from helios.commands import memory
from helios.config import compose

REAL_STAGE1 = ["stage=1", "stage1=init", "model=wan14b", "model.transformer.path=/nonexistent", "data=/d"]


def test_parameter_counts_equal_the_models_the_stage_builds():
    """The fake-built roles hold exactly the parameters (frozen / trainable) of the real tiny model."""
    from helios.stages import FlowStage

    cfg = compose([])
    (role,) = memory.build_roles(cfg, torch.float32)
    real = FlowStage(cfg).build_model()
    assert role.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0
    assert sum(role.frozen) == 4 * sum(p.numel() for p in real.parameters() if not p.requires_grad)


def test_checkpointed_activations_grow_by_one_block_input_per_layer():
    """14B width, 384x640, history 16/2/1 + window 9: with gradient checkpointing each block keeps only its
    input, [batch, tokens, 5120] in bf16, tokens = 8640 noisy + 2x960 short + 240 mid + 240 long = 11040
    (hand-counted from the patch sizes); without checkpointing a block keeps far more."""
    totals = {}
    for layers in (1, 2):
        cfg = compose([*REAL_STAGE1, f"model.transformer.num_layers={layers}"])
        (role,) = memory.build_roles(cfg, torch.bfloat16)
        totals[layers] = memory.activation_bytes(cfg, role, 2, (48, 80), torch.bfloat16)
    assert totals[2][0] - totals[1][0] == 2 * 11040 * 5120 * 2
    assert totals[2][1] > 10 * (totals[2][0] - totals[1][0])  # one block's own saved tensors


def test_pinned_bytes_are_the_offload_pools_buffers():
    """The model's pinned host bytes are what the offload pool allocates: one buffer per role of the
    role's frozen bytes, each tensor 16-byte aligned (no power-of-two rounding per tensor)."""
    from helios.infra.offload import OffloadPool

    roles = {"generator": torch.nn.Linear(5, 3), "critic": torch.nn.Linear(7, 2, bias=False)}
    for role in roles.values():
        role.requires_grad_(False)
    pool = OffloadPool(roles, torch.device("cpu"))
    for name, role in roles.items():
        sizes = [p.numel() * p.element_size() for p in role.parameters()]
        assert pool.buffers[name].numel() == memory.pinned_bytes(sizes)
        assert all(h.untyped_storage().data_ptr() == pool.buffers[name].data_ptr() for h in pool.host[name])
    assert memory.pinned_bytes([60, 12]) == 64 + 16  # 15x4 and 3x4 bytes
    pool.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_offload_schedule_is_what_a_stage3_step_activates(tmp_path, monkeypatch, prefetch):
    """offload_schedule (what the model counts as resident and in flight) is exactly the set of
    activations of real stage-3 steps with the offload pool (with and without a generator update)."""
    from helios.infra.offload import OffloadPool
    from tests.helpers.runs import train_in_process as _train

    calls = []
    original = OffloadPool.activate

    def spy(self, *names, prefetch=None):
        calls.append((set(names), prefetch))
        return original(self, *names, prefetch=prefetch)

    monkeypatch.setattr(OffloadPool, "activate", spy)
    overrides = [
        "stage=3",
        "distill.offload=true",
        f"distill.offload_prefetch={str(prefetch).lower()}",
        "trainer.max_steps=2",
        "distill.ttur=2",  # step 0 updates the generator, step 1 only the critic
        "distill.gan.start_step=0",
        "trainer.checkpoint_every=0",
    ]
    _train(overrides, tmp_path)
    schedule = memory.offload_schedule(compose(overrides).distill)
    assert all(c in schedule for c in calls), [c for c in calls if c not in schedule]
    assert all(s in calls for s in schedule)
    # one base at a time without prefetch: nothing in flight, never two bases resident
    assert prefetch or all(ahead is None and not {"generator", "critic"} <= names for names, ahead in calls)


def test_cli_prints_every_category_and_the_last_line(capsys):
    assert memory_command.main(["world_size=2", "height=64", "width=64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("model: AdamW state") for line in out)
    assert re.fullmatch(r"peak_gib_per_gpu=\d+\.\d host_gib_per_node=\d+\.\d", out[-1])
    assert memory_command.main(["--help"]) == 0 and "world_size" in capsys.readouterr().out


def test_zero3_roles_count_the_checkpoint_gather():
    cfg = compose(["stage=3", "parallel=zero3", "distill.teacher=/t"])
    items = memory.estimate(cfg, 2, (8, 8))
    gathered = [i for i in items if i.when == "checkpoint"]
    assert len(gathered) == 1 and gathered[0].gpu > 0


LAYOUTS_THAT_FIT = [  # (the README memory table's overrides, the limit in GiB per GPU)
    (["stage=1", "stage1=init"], 56),
    (["stage=1", "stage1=post", "init_from=/x"], 56),
    (["stage=2", "stage2=init", "init_from=/x"], 70),
    (["stage=2", "stage2=post", "init_from=/x"], 70),
    (["stage=3", "stage3=ode", "init_from=/x"], 72),
    (["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "parallel.roles.critic=zero3"], 80),
    (["stage=3", "stage3=post", "init_from=/x", "parallel=zero3"], 80),
    (["stage=3", "stage3=post", "init_from=/x", "distill.offload=true"], 72),  # the paper's layout
    (["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "distill.offload=true"], 80),
]


@pytest.mark.parametrize("overrides,limit", LAYOUTS_THAT_FIT)
def test_fitting_14b_layouts_stay_under_their_limits(overrides, limit):
    """The README's 14B layouts stay under their limits (the step and, under ZeRO-3, writing a
    checkpoint and starting up; the host at build and in steady state): shapes are the real ones, so
    this arithmetic is exact and deterministic."""
    cfg = compose([*overrides, "model=wan14b", "model.transformer.path=/x", "data=/d", "distill.teacher=/x"])
    _, peak, host = memory.report(memory.estimate(cfg, 8, (48, 80)), 8)
    assert peak <= limit
    assert host <= 512  # GiB per 8-GPU node, also while the models are built


@pytest.mark.parametrize(
    ("arg", "reason"), [("world_size=0", "must be >= 1"), ("world_size=-8", "must be >= 1"),
                        ("world_size=abc", "not a whole number"), ("height=12x", "not a whole number")],
)  # fmt: skip
def test_cli_refuses_bad_sizes_in_one_line(capsys, arg, reason):
    assert memory_command.main([arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config error at '{arg.split('=')[0]}'") and reason in err
    assert len(err.splitlines()) == 1
