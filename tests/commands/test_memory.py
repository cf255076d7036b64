"""python -m helios.memory: counts equal the built models, activations against hand-counted tokens, the
offload schedule against a real step, the command's last line."""

import re

import pytest
import torch

from helios import memory as memory_command
from helios.commands import memory_estimate
from helios.commands import memory_trace as trace
from helios.config import compose

REAL_STAGE1 = ["stage=1", "stage1=init", "model=wan14b", "model.transformer.path=/nonexistent", "data=/d"]


def test_parameter_counts_equal_the_models_the_stage_builds():
    """The fake-built roles hold exactly the parameters (frozen / trainable) of the real tiny model."""
    from helios.stages import Stage1Base

    cfg = compose([])
    (role,) = memory_estimate.build_roles(cfg, torch.float32)
    real = Stage1Base(cfg).build_model()
    assert role.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0
    assert sum(role.frozen) == 4 * sum(p.numel() for p in real.parameters() if not p.requires_grad)


def test_checkpointed_activations_grow_by_one_block_input_per_layer():
    """14B width, 384x640, history 16/2/1 + window 9: with gradient checkpointing each block keeps only its
    input, [batch, tokens, 5120] in bf16, tokens = 8640 noisy + 2x960 short + 240 mid + 240 long = 11040
    (hand-counted from the patch sizes); without checkpointing a block keeps far more."""
    totals = {}
    for layers in (1, 2):
        cfg = compose([*REAL_STAGE1, f"model.transformer.num_layers={layers}"])
        roles = memory_estimate.build_roles(cfg, torch.bfloat16)
        fakes = memory_estimate.FakeRoles(cfg, roles, torch.bfloat16)
        totals[layers] = fakes.training("model", trace.Inputs(2, (48, 80)))
    assert totals[2][0] - totals[1][0] == 2 * 11040 * 5120 * 2
    assert totals[2][1] > 10 * (totals[2][0] - totals[1][0])  # one block's own saved tensors
    assert totals[2][2] > 0  # and the backward's activation gradients on top


def _profiled_step(model, inputs, cfg) -> int:
    """Peak bytes the CPU allocator took over one real forward + backward (torch profiler memory events);
    the gradients are allocated before it (the model counts them as gradients)."""
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = inputs.forward(cfg, model, grad=True)
        out.float().square().mean().backward()
        del out
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_the_backward_peak_is_what_a_real_block_allocates():
    """The model's activation peak of a training step (saved + one block recomputed + backward_transient)
    against a real-tensor DiT (2 blocks of the 14B block at 1/5 width: dim 1024, ffn 2764, LoRA 128,
    gradient checkpointing, bf16 autocast, 2,760 tokens) whose forward + backward the torch profiler
    follows on the CPU allocator: equal up to the step's inputs and output, which the model leaves out
    (< 3 %); the fake-tensor counter reads the real step's peak to 0.01 %."""
    from dataclasses import replace

    from helios.config.schema import KernelsConfig
    from helios.model import apply_lora, build_transformer
    from helios.model.transformer import cast_frozen

    shape = ["num_layers=2", "num_attention_heads=8", "ffn_dim=2764", "gradient_checkpointing=true"]
    cfg = compose([*REAL_STAGE1, *(f"model.transformer.{s}" for s in shape)])
    inputs = trace.Inputs(1, (24, 40))
    torch.manual_seed(0)
    tcfg = replace(cfg.model.transformer, source="random", path=None)
    real = apply_lora(build_transformer(tcfg, KernelsConfig(), "sdpa"), cfg.model.lora)
    cast_frozen(real, torch.bfloat16)
    real.enable_gradient_checkpointing()
    measured = _profiled_step(real, inputs, cfg)

    fakes = memory_estimate.FakeRoles(cfg, memory_estimate.build_roles(cfg, torch.bfloat16), torch.bfloat16)
    saved, block, transient, _ = fakes.training("model", inputs)
    modelled = saved + block + transient
    assert transient > 0.2 * block  # the transient is real: about a third of a block here
    assert 0 <= measured - modelled < 0.03 * measured
    mode = fakes.modes[id(fakes.short["model"].module)]
    _, fake_peak = trace.training_peak(cfg, fakes.short["model"].module, inputs, mode)
    assert fake_peak == pytest.approx(measured, rel=1e-4)  # the allocator's few scalars aside


def test_live_bytes_counts_each_storage_once_until_it_dies():
    """LiveBytes: a view adds nothing, a freed tensor comes off, ignored storages never count."""
    tracker = trace.LiveBytes()
    kept = torch.ones(10)
    tracker.ignore([kept])
    with tracker:
        a = torch.zeros(100)  # 400 bytes
        v = a.view(10, 10)  # a view: the same storage
        b = kept.view(2, 5) * 1  # a new 40-byte storage; kept itself is ignored
        assert tracker.live == 440
        del a, v
        c = torch.zeros(25)  # 100 bytes
        assert tracker.live == 140
    assert tracker.peak == 440 and b.numel() == 10 and c.numel() == 25


def test_pinned_bytes_are_the_offload_pools_buffers():
    """The model's pinned host bytes are what the offload pool allocates: one buffer per role of the
    role's frozen bytes, each tensor 16-byte aligned (no power-of-two rounding per tensor)."""
    from helios.infra.offload import OffloadPool

    roles = {"generator": torch.nn.Linear(5, 3), "critic": torch.nn.Linear(7, 2, bias=False)}
    for role in roles.values():
        role.requires_grad_(False)
    sizes = {name: [p.numel() * p.element_size() for p in role.parameters()] for name, role in roles.items()}
    pool = OffloadPool(roles, torch.device("cpu"))  # released: the weights' bytes are in the pool's buffers
    for name in roles:
        assert pool.buffers[name].numel() == memory_estimate.pinned_bytes(sizes[name])
        assert all(h.untyped_storage().data_ptr() == pool.buffers[name].data_ptr() for h in pool.host[name])
    assert memory_estimate.pinned_bytes([60, 12]) == 64 + 16  # 15x4 and 3x4 bytes
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
        if names or prefetch is not None:  # not a CPU's release at a block's end (nothing resident)
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
    schedule = memory_estimate.offload_schedule(compose(overrides).distill)
    assert all(c in schedule for c in calls), [c for c in calls if c not in schedule]
    assert all(s in calls for s in schedule[1:])  # the first, validation's, does not run in 2 steps here
    # one base at a time without prefetch: nothing in flight, never two bases resident
    assert prefetch or all(ahead is None and not {"generator", "critic"} <= names for names, ahead in calls)


def test_cli_prints_every_category_each_phase_and_the_last_line(capsys):
    """Every category, the named lines of the peak (backward_transient, runtime_overhead, validation) and
    each phase's peak; the last line is the maximum over the phases."""
    assert memory_command.main(["world_size=2", "height=64", "width=64", "validation.enabled=true"]) == 0
    out = capsys.readouterr().out.splitlines()
    for start in ("model: AdamW state", "backward_transient:", "runtime_overhead:", "validation:"):
        assert any(line.startswith(start) for line in out), start
    phases = {}
    for phase, name in memory_estimate.PHASE_NAMES.items():
        (line,) = [line for line in out if line.startswith(name + " ")]
        phases[phase] = [float(x) for x in line.split()[-2:]]
    match = re.fullmatch(r"peak_gib_per_gpu=(\d+\.\d) host_gib_per_node=(\d+\.\d)", out[-1])
    assert match
    assert float(match[1]) == round(max(g for g, _ in phases.values()), 1)
    assert float(match[2]) == round(max(h for _, h in phases.values()), 1)
    assert memory_command.main(["--help"]) == 0 and "world_size" in capsys.readouterr().out


def test_zero3_roles_count_the_checkpoint_gather():
    cfg = compose(["stage=3", "parallel=zero3", "distill.teacher=/t"])
    items = memory_estimate.estimate(cfg, 2, (8, 8))
    gathered = [i for i in items if i.when == ("checkpoint",) and "ZeRO-3" in i.category]
    assert len(gathered) == 1 and gathered[0].gpu > 0


def test_phases_hold_what_each_phase_holds():
    """The step holds the activations but not validation's VAE; validation the VAE but no activations;
    the text encoder only while the prompts are encoded at start-up; what the main rank writes once per
    node; runtime_overhead in every phase."""
    cfg = compose(["stage=3", "distill.teacher=/t", "validation.enabled=true"])
    items = memory_estimate.estimate(cfg, 2, (8, 8))
    by = {i.category.split(":")[0].split(" (")[0]: i for i in items}
    assert by["backward_transient"].when == ("step",)
    assert by["runtime_overhead"].when == memory_estimate.PHASES
    held = {p: {i.category for i in items if p in i.when} for p in memory_estimate.PHASES}
    assert not any("text encoder" in c for p in ("step", "validation", "checkpoint") for c in held[p])
    assert any("text encoder" in c for c in held["prompts"])
    assert any(c.startswith("validation: VAE") for c in held["validation"])
    assert not any(c.startswith("activations") for c in held["validation"])
    written = [i for i in items if i.category.startswith("checkpoint: what the main rank writes")]
    assert written[0].host_per == "node" and written[0].host > 0
    peaks = memory_estimate.phase_peaks(items, 8)
    step = sum(i.gpu for i in items if "step" in i.when)
    assert peaks.phases["step"][0] == pytest.approx(step / memory_estimate.GIB)


# The 14B memory table's rows (docs/scale-out.md, bench/memory_table.py) against the peak-memory issue's
# limits: <= 72 GiB per 80 GB GPU and <= 400 GiB host per 8-GPU node, at the peak of every phase. Rows still
# over them are strict xfails (README "Not yet"): they fail the day a change makes them fit, so the table is
# updated with it.
OVER = pytest.mark.xfail(strict=True, reason="over the limits (docs/scale-out.md memory table, issue #32)")
LAYOUTS = [
    pytest.param(["stage=1", "stage1=init"], id="1-init"),
    pytest.param(["stage=1", "stage1=post", "init_from=/x"], id="1-post"),
    pytest.param(["stage=2", "stage2=init", "init_from=/x"], id="2-init"),
    pytest.param(["stage=2", "stage2=post", "init_from=/x"], id="2-post"),
    pytest.param(["stage=3", "stage3=ode", "init_from=/x"], id="3-ode"),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "distill.offload=true"],
                 id="3-post-paper-activations-resident", marks=OVER),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "distill.offload=true",
                  "model.transformer.checkpoint_offload=true"], id="3-post-paper"),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "distill.offload=true"],
                 id="3-post-reference"),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "parallel.roles.critic=zero3"],
                 id="3-post-critic-zero3"),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "parallel=zero3"], id="3-post-zero3"),
    pytest.param(["stage=3", "stage3=post", "init_from=/x", "parallel=zero3",
                  "parallel.zero_hpz_partition_size=8"], id="3-post-zero3-hpz"),
]  # fmt: skip


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_14b_layouts_stay_under_the_limits_at_every_phase(overrides):
    """Shapes are the real ones and the counts deterministic, so this arithmetic is exact; world size 8."""
    cfg = compose([*overrides, "model=wan14b", "model.transformer.path=/x", "data=/d", "distill.teacher=/x"])
    peaks = memory_estimate.phase_peaks(memory_estimate.estimate(cfg, 8, (48, 80)), 8)
    assert peaks.gpu <= 72, peaks.phases
    assert peaks.host <= 400, peaks.phases


def test_offloaded_block_inputs_leave_the_gpu_for_the_host():
    """model.transformer.checkpoint_offload: the blocks' saved inputs (40 per forward, bf16 [B, L, 5120])
    leave the GPU's saved activations for pinned host memory; one comes back per recomputed block."""
    common = ["stage=1", "stage1=init", "model=wan14b", "model.transformer.path=/x", "data=/d"]

    def counted(overrides: list[str]) -> dict[str, memory_estimate.Item]:
        items = memory_estimate.estimate(compose([*common, *overrides]), 8, (48, 80))
        return {i.category.split(" (")[0].split(":")[0]: i for i in items}

    resident, offloaded = counted([]), counted(["model.transformer.checkpoint_offload=true"])
    host = offloaded["activations"].host  # the blocks' saved inputs in pinned host memory
    moved = resident["activations saved for backward"].gpu - offloaded["activations saved for backward"].gpu
    assert host > 0 and moved == pytest.approx(host, rel=1e-6)
    tokens = 9 * 24 * 40 + 2400  # the noisy window (9 latent frames of 24 x 40 patches) and the history
    assert host == 40 * 2 * tokens * 5120 * 2  # 40 blocks x batch 2 x bf16
    restored = offloaded["backward"].gpu - resident["backward"].gpu
    assert restored == host / 40


def test_hpz_adds_a_node_local_partition_of_each_zero3_role():
    """parallel.zero_hpz_partition_size=8 at world 64: each ZeRO-3 weight also 1/8 on every GPU."""
    common = [
        "stage=1",
        "stage1=init",
        "model=wan14b",
        "model.transformer.path=/x",
        "data=/d",
        "parallel=zero3",
    ]
    plain = {i.category: i for i in memory_estimate.estimate(compose(common), 64, (48, 80))}
    hpz = {
        i.category: i
        for i in memory_estimate.estimate(
            compose([*common, "parallel.zero_hpz_partition_size=8"]), 64, (48, 80)
        )
    }
    base = plain["model: frozen base (ZeRO-3 partition + gathered)"]
    assert hpz["model: frozen base (ZeRO-3 partition + gathered)"] == base
    roles = memory_estimate.build_roles(compose(common), torch.bfloat16)
    assert hpz["model: frozen base, hpZ partition over 8 ranks"].gpu == sum(roles[0].frozen) / 8
    added = hpz["model: trainable weights (fp32)"].gpu - plain["model: trainable weights (fp32)"].gpu
    assert added == pytest.approx(4 * roles[0].trainable / 8)


def test_bases_read_once_per_node_are_counted_once_per_node_while_the_models_are_built():
    """Stage 3's two bases: 8 ranks x 62.7 GiB when every rank reads them; once per node (+ the one being read
    or copied) with parallel.node_shared_weights; a stage-1 base read from the Wan directory: per rank."""
    common = ["model=wan14b", "model.transformer.path=/x", "data=/d", "distill.teacher=/x"]
    post = ["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "distill.offload=true", *common]

    def build(overrides: list[str]) -> tuple[float, list[memory_estimate.Item]]:
        items = memory_estimate.estimate(compose(overrides), 8, (48, 80))
        at_build = [i for i in items if i.when == ("build",) and i.host]
        return memory_estimate.phase_peaks(items, 8).phases["build"][1], at_build

    shared, items = build(post)
    private, _ = build([*post, "parallel.node_shared_weights=false"])
    bases = [i for i in items if "/dev/shm" in i.category]
    assert len(bases) == 1 and bases[0].host_per == "node"
    base = 14e9 * 2 / memory_estimate.GIB  # one 14B base in bf16, about
    assert private - shared == pytest.approx(8 * 2 * base - 3 * base, rel=0.05)
    assert private > 400 >= shared
    _, items = build(["stage=1", "stage1=init", *common])
    assert all(i.host_per == "rank" for i in items)


@pytest.mark.parametrize(
    ("arg", "reason"), [("world_size=0", "must be >= 1"), ("world_size=-8", "must be >= 1"),
                        ("world_size=abc", "not a whole number"), ("height=12x", "not a whole number")],
)  # fmt: skip
def test_cli_refuses_bad_sizes_in_one_line(capsys, arg, reason):
    assert memory_command.main([arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config error at '{arg.split('=')[0]}'") and reason in err
    assert len(err.splitlines()) == 1
