"""End-to-end training on CPU: the CLI run directory, overfitting, exact resume, 2-process DDP."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helios.config import compose
from helios.infra.checkpoint import MARKER, list_complete, resolve_resume
from helios.infra.metrics import read_metrics
from helios.model.transformer import build_transformer
from helios.trainer import Trainer
from tests.helpers.runs import train_cli
from tests.helpers.runs import train_in_process as _train

ROOT = Path(__file__).resolve().parents[2]


def test_cli_tiny_run_writes_the_run_directory(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train_helios.py",
            f"hydra.run.dir={tmp_path}",
            "trainer.max_steps=10",
            "trainer.checkpoint_every=5",
            "trainer.log_every=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "config.yaml").read_text().startswith("stage: 1")
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "host_rss_gib"):
        assert all(isinstance(m[key], float) and m[key] > 0 for m in metrics), key
    assert "mfu" not in metrics[0] and "max_memory_gib" not in metrics[0]  # a GPU's only
    assert [s for s, _ in list_complete(tmp_path)] == [5, 10]
    video = tmp_path / "samples" / "step_10_0.mp4"
    import decord

    reader = decord.VideoReader(str(video))
    assert len(reader) == 90 and reader[0].shape == (64, 64, 3)
    stats = json.loads(video.with_suffix(".json").read_text())
    assert len(stats["drift"]["sections"]) == 10 and "ratio" in stats["seams"]  # 10 sections of 9 frames
    assert (tmp_path / "samples" / "step_10_1.mp4").exists()  # the second prompt
    assert "val/0/seam_ratio" in metrics[-1] and "val/0/drift_saturation" in metrics[-1]
    # the tiny default's prompts are moving-shapes captions: the world's measures are logged with the video,
    # for the whole video and for each of its 10 sections
    world = {f"val/0/world_{k}": v for k, v in stats["world"].items()}
    assert {"val/0/world_background_match", "val/0/world_shape_colour_match"} <= world.keys()
    sections = {f"val/1/world_section{k}_{m}" for k in range(10) for m in ("present", "colour", "advance")}
    assert sections | {"val/1/world_long_min_present", "val/1/world_long_moves_along"} <= metrics[-1].keys()
    assert all(metrics[-1][k] == v for k, v in world.items())


def test_loss_decreases_when_overfitting_two_clips(tmp_path):
    metrics = _train(
        # full fine-tuning: LoRA on a random tiny base has too little capacity to memorise
        [
            "data.synthetic.num_videos=2",
            "trainer.batch_size=2",
            "trainer.max_steps=200",
            "optim.lr=1e-3",
            "model.lora.enabled=false",
            "trainer.checkpoint_every=0",
            "history.corrupt.enabled=false",
            "seed=3",
        ],
        tmp_path,
    )
    losses = [m["loss"] for m in metrics]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.7 * first, (first, last)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # max_steps=3 stands in for an interruption: a constant lr (a cosine schedule follows max_steps)
    common = ["trainer.checkpoint_every=3", "trainer.max_steps=6", "seed=5", "optim.schedule=constant"]
    full = _train(common, tmp_path / "full")
    _train([*common, "trainer.max_steps=3"], tmp_path / "split")
    assert [s for s, _ in list_complete(tmp_path / "split")] == [3]
    resumed = _train(common, tmp_path / "split")  # resume=latest picks step_3
    by_step = {m["step"]: m["loss"] for m in resumed}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    for m in full[3:]:
        assert by_step[m["step"]] == pytest.approx(m["loss"], rel=1e-6, abs=1e-7), m["step"]


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    _train(["trainer.checkpoint_every=2", "trainer.max_steps=2"], tmp_path)
    broken = tmp_path / "checkpoints" / "step_4"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "step_6.tmp-123").mkdir()
    assert resolve_resume("latest", tmp_path).name == "step_2"
    assert (resolve_resume("latest", tmp_path) / MARKER).exists()
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(broken), tmp_path)


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "tests/helpers/ddp_probe.py",
            str(tmp_path),
            "model.lora.enabled=true",  # the 14B recipe's LoRA, under DDP
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys() and len(w0) > 0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    init = load_file(str(tmp_path / "init.safetensors"))
    assert init.keys() == w0.keys()
    # the LoRA-B factors moved away from their initial zeros
    assert all(not init[k].any() for k in init if "lora_B" in k)
    assert any(w0[k].any() for k in w0 if "lora_B" in k)
    s0 = json.loads((tmp_path / "rank0.json").read_text())
    s1 = json.loads((tmp_path / "rank1.json").read_text())
    # each step the two ranks read disjoint clips of the same epoch (2 per rank per step)
    for (e0, i0), (e1, i1) in zip(s0["seen"], s1["seen"]):
        assert e0 == e1 and not set(i0) & set(i1)
    assert s0["losses"] == s1["losses"]  # metrics are all-reduced
    # a checkpoint's tensors are assembled on the main rank alone (no host copy on the others), and it
    # holds the trained weights by value
    assert (s0["assembled"], s1["assembled"]) == (1, 0) and s0["checkpoint"] == s1["checkpoint"]
    saved = load_file(str(Path(s0["checkpoint"]) / "trainable.safetensors"))
    assert saved.keys() == w0.keys() and all(torch.equal(saved[k], w0[k]) for k in w0)


def test_init_from_starts_from_the_previous_function_with_a_fresh_optimizer(tmp_path):
    """Stage 1 (LoRA r=8) -> stage 2 with another LoRA rank: LoRA merged, the model's output unchanged."""
    from helios.loading import load_for_inference

    _train(["trainer.checkpoint_every=3", "trainer.max_steps=3", "optim.lr=1e-2"], tmp_path / "s1")
    previous = load_for_inference(tmp_path / "s1", torch.device("cpu")).transformer
    cfg = compose(
        [
            "stage=2",
            "validation.enabled=false",
            "trainer.progress=false",
            f"init_from={tmp_path / 's1'}",
            "model.lora.rank=4",
            "model.lora.alpha=4",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "s2")
    trainer._build_data()
    trainer._build_model()
    assert trainer.step == 0 and not trainer.backend.optimizer.state
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 32, 32, generator=gen),
    )
    with torch.no_grad():
        before = previous(**inputs, return_dict=False)[0]
        after = trainer.model(**inputs, return_dict=False)[0]
        fresh = build_transformer(cfg.model.transformer)(**inputs, return_dict=False)[0]
    assert not torch.allclose(before, fresh, atol=1e-4)  # training changed the function ...
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # ... and stage 2 starts from it
    assert any("lora_A" in n and p.shape[0] == 4 for n, p in trainer.model.named_parameters())
    trainer.close()


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=bf16", "model.transformer.gradient_checkpointing=true"],
        ["history.multi_term_patch=false"],
        ["history.relative_rope=false", "history.anchor=false"],
        ["history.corrupt.mode=reference", "flow.timestep_sampling=uniform", "flow.shift.type=linear"],
        [
            "model.transformer.guidance_cross_attn=false",
            "model.transformer.zero_history_timestep=false",
            "model.transformer.is_amplify_history=true",
        ],
        ["model.lora.memory_patch=lora", "model.lora.targets=[to_q,to_v]", "trainer.grad_accum=2"],
        ["model.lora.enabled=false", "optim.schedule=cosine", "optim.warmup_steps=1"],
    ],
    ids=[
        "bf16-ckpt",
        "no-multi-term",
        "abs-rope-no-anchor",
        "reference-corrupt",
        "guidance-attn",
        "lora-variants",
        "full-ft",
    ],
)
def test_every_switch_trains(tmp_path, overrides):
    metrics = _train(["trainer.max_steps=2", "trainer.checkpoint_every=0", *overrides], tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0 for m in metrics)


def _last_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}  # later lines (after resume) win


@pytest.mark.slow
def test_killed_two_process_run_resumes_exactly(tmp_path):
    """SIGKILL a 2-process DDP run once its step-2 checkpoint exists, resume it, and compare every later
    step's loss with an uninterrupted run."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "trainer.max_steps=12",
        "trainer.checkpoint_every=2",
        "trainer.log_every=1",
        "trainer.keep_last=10",
        "validation.enabled=false",
        "trainer.progress=false",
        "seed=11",
    ]

    def launch(run_dir: Path) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_helios.py",
            f"hydra.run.dir={run_dir}",
            *args,
        ]
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )

    full = launch(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]

    killed = launch(tmp_path / "killed")
    marker = tmp_path / "killed" / "checkpoints" / "step_2" / "COMPLETE"
    deadline = time.monotonic() + 600
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    done = [s for s, _ in list_complete(tmp_path / "killed")]
    assert 2 in done and max(done) < 12  # it died mid-run, with step 2 saved

    resumed = launch(tmp_path / "killed")  # resume=latest
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    ref, got = _last_losses(tmp_path / "full"), _last_losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 13))
    for step in range(max(done) + 1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def test_a_crash_while_writing_engine_state_leaves_no_checkpoint_to_resume(tmp_path):
    """DeepSpeed partitions are written inside the temporary folder before the marker: if that write
    fails, resume=latest still picks the previous complete checkpoint, and the next save cleans up."""
    from helios.infra import checkpoint
    from helios.infra.distributed import DistInfo

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    weights = {"trainable": {"w": torch.ones(2)}}
    checkpoint.save(tmp_path, 1, info, weights, {"step": 1}, {}, keep_last=3)

    def crash(tmp: Path) -> None:
        (tmp / "zero" / "model").mkdir(parents=True)
        (tmp / "zero" / "model" / "partial.pt").write_bytes(b"\0" * 10)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, info, weights, {"step": 2}, {}, keep_last=3, write_extra=crash)
    assert [s for s, _ in list_complete(tmp_path)] == [1]
    assert resolve_resume("latest", tmp_path).name == "step_1"
    checkpoint.save(tmp_path, 3, info, weights, {"step": 3}, {}, keep_last=3)
    assert not list((tmp_path / "checkpoints").glob("step_*.tmp-*"))  # the crashed save's leftovers
    assert [s for s, _ in list_complete(tmp_path)] == [1, 3]


def test_resume_keeps_the_init_from_checkpoint_it_started_with(tmp_path):
    """``init_from=RUN`` is pinned to RUN's newest checkpoint at start-up (absolute path, recorded in every
    checkpoint); resuming later keeps it even when RUN has trained on since."""
    first = tmp_path / "first"
    _train(["trainer.max_steps=2", "trainer.checkpoint_every=2"], first)
    nxt = ["trainer.checkpoint_every=1", f"init_from={first}"]
    _train([*nxt, "trainer.max_steps=1"], tmp_path / "next")
    _train(["trainer.max_steps=4", "trainer.checkpoint_every=2"], first)  # the source run trains on
    _train([*nxt, "trainer.max_steps=2"], tmp_path / "next")  # resume=latest
    pinned = str((first / "checkpoints" / "step_2").resolve())
    for step in (1, 2):
        meta = json.loads((tmp_path / "next" / "checkpoints" / f"step_{step}" / "meta.json").read_text())
        assert meta["sources"]["init_from"] == pinned
    assert f"init_from: {pinned}" in (tmp_path / "next" / "config.yaml").read_text()


def test_lora_all_linear_is_the_reference_set():
    """all-linear = the reference code's set (the released weights' adapters): every nn.Linear without "norm"
    in its name, i.e. also the embedders, the adaLN projection and the output head, plus the patch embedding;
    targets=blocks keeps the blocks-only set."""
    from helios.model.lora import linear_targets
    from helios.model.transformer import build_transformer

    model = build_transformer(compose(["model.lora.enabled=true"]).model.transformer)
    outside = {
        "condition_embedder.time_embedder.linear_1",
        "condition_embedder.time_embedder.linear_2",
        "condition_embedder.time_proj",
        "condition_embedder.text_embedder.linear_1",
        "condition_embedder.text_embedder.linear_2",
        "proj_out",
        "patch_embedding",
    }
    blocks = set(linear_targets(model, "blocks"))
    assert blocks and all(n.startswith("blocks.") for n in blocks)
    assert set(linear_targets(model)) == blocks | outside
    from helios.model.lora import apply_lora

    lora = apply_lora(model, compose(["model.lora.enabled=true"]).model.lora)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A." in n}
    assert adapted == blocks | outside


def test_global_batch_that_does_not_divide_names_working_settings():
    """Table 1's stage-2-post global batch 192 starts on the paper's 64 GPUs (the reference's 1 clip x 3
    stages per GPU) and on 8; a batch that cannot be met names the nearest settings."""
    from helios.config.schema import ConfigError
    from helios.infra.resolve import resolve_grad_accum

    post = compose(["stage=2", "stage2=post", "model.transformer.path=/m", "data=/d"])
    assert resolve_grad_accum(post, 64) == 1 and resolve_grad_accum(post, 8) == 8
    bad = compose(["trainer.batch_size=4", "trainer.global_batch_size=100"])
    with pytest.raises(ConfigError, match=r"trainer.batch_size=2 or trainer.global_batch_size=96 or .*=104"):
        resolve_grad_accum(bad, 2)


def test_stage2_memory_patches_follow_the_reference():
    """Frozen in stage-2 init, LoRA in stage-2 post (the reference configs that trained Helios-Mid)."""
    from helios.model.lora import MEMORY_PATCHES, apply_lora
    from helios.model.transformer import build_transformer

    for phase, want in (("init", "frozen"), ("post", "lora")):
        cfg = compose(["stage=2", f"stage2={phase}", "model.transformer.path=/m", "data=/d"])
        assert cfg.model.lora.memory_patch == want
    tiny = compose(["model.lora.enabled=true"]).model
    for mode, trained in (("frozen", set()), ("lora", {"lora"}), ("full", {"full"})):
        lora = dataclasses.replace(tiny.lora, memory_patch=mode)
        model = apply_lora(build_transformer(tiny.transformer), lora)
        kinds = {
            "lora" if "lora_" in n else "full"
            for n, p in model.named_parameters()
            if p.requires_grad and n.split(".")[0] in MEMORY_PATCHES
        }
        assert kinds == trained, mode


def test_resume_applies_a_changed_learning_rate_and_refuses_other_changes(tmp_path):
    """The resume contract (helios.infra.resume): optim.lr and the other changeable settings may change, are
    applied from the resumed step on, recorded in config_history.jsonl; any other change stops, naming it."""
    from helios.config.schema import ConfigError

    common = ["trainer.checkpoint_every=2", "optim.schedule=constant"]
    _train([*common, "optim.lr=2e-3", "trainer.max_steps=2"], tmp_path)
    resumed = _train([*common, "optim.lr=1e-5", "trainer.max_steps=4"], tmp_path)
    assert [m["lr"] for m in resumed if m["step"] > 2] == [1e-5, 1e-5]
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"]["optim.lr"] == [2e-3, 1e-5]
    assert "lr: 1.0e-05" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="cannot change on resume") as err:
        _train(
            [*common, "optim.lr=1e-5", "trainer.max_steps=6", "flow.logit_std=2.0"],
            tmp_path,
        )
    assert err.value.key == "flow.logit_std"


class _ScaledLoss:
    """The trainer's role steps with every loss multiplied by ``scale`` before its backward (a loss that
    diverges as the stage computes it)."""

    def __init__(self, roles, scale: float) -> None:
        self.roles, self.scale = roles, scale

    def forward(self, role, fn, *args, final=True):
        return self.roles.forward(role, fn, *args, final=final)

    def backward(self, role, loss):
        self.roles.backward(role, loss * self.scale)

    def splittable(self, role):
        return self.roles.splittable(role)


def test_divergence_stops_before_any_update_names_role_and_checkpoint_and_resume_continues(
    tmp_path, monkeypatch
):
    """A non-finite loss at step 3 stops the run before the optimizer and before a checkpoint, naming the
    step, the role and the last checkpoint (step 2), which a resume continues from."""
    from helios.stages import Stage1Base

    original = Stage1Base.forward_backward

    def poisoned(self, model, batch, generator, shared=None, roles=None, *, step):
        scale = float("nan") if step == 2 else 1.0
        return original(self, model, batch, generator, shared, _ScaledLoss(roles, scale), step=step)

    monkeypatch.setattr(Stage1Base, "forward_backward", poisoned)
    with pytest.raises(FloatingPointError) as err:
        _train(["trainer.max_steps=4", "trainer.checkpoint_every=1"], tmp_path)
    message = str(err.value)
    assert "the model loss is nan at step 3" in message and "step_2" in message and "resume=latest" in message
    from helios.infra.checkpoint import list_complete

    assert [p.name for _, p in list_complete(tmp_path)] == [
        "step_1",
        "step_2",
    ]
    monkeypatch.undo()
    resumed = _train(["trainer.max_steps=4", "trainer.checkpoint_every=1"], tmp_path)
    assert [m["step"] for m in resumed][-2:] == [3, 4]


def test_gradient_clipping_bounds_the_gradient_the_optimizer_sees(tmp_path, monkeypatch):
    """With a clip far below the gradient norm, the reported (pre-clip) norm exceeds it and the gradient
    that reaches AdamW has exactly the clip's norm."""
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    metrics = _train(["trainer.max_steps=2", "trainer.checkpoint_every=0", "optim.grad_clip=1e-4"], tmp_path)
    assert all(m["grad_norm"] > 1e-3 for m in metrics)
    assert seen == pytest.approx([1e-4, 1e-4], rel=1e-3)


def test_corrupt_checkpoint_is_named_and_resume_falls_back_to_one_that_verifies(tmp_path, caplog):
    """Every checkpoint has a manifest (size + SHA-256 per file). A truncated newest checkpoint: resume=latest
    says so and continues from the one before (repeating its steps exactly); resume=<it> names the file
    and the checkpoint that verifies."""
    from helios.infra import checkpoint as ckpt

    common = ["trainer.checkpoint_every=2", "trainer.keep_last=3"]
    full = {m["step"]: m["loss"] for m in _train([*common, "trainer.max_steps=4"], tmp_path / "full")}
    run = tmp_path / "run"
    _train([*common, "trainer.max_steps=4"], run)
    newest = run / "checkpoints" / "step_4"
    assert json.loads((newest / "manifest.json").read_text())["trainable.safetensors"]["bytes"] > 0
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"trainable.safetensors has 100 bytes.*step_2 verifies"):
        _train([*common, "trainer.max_steps=6", f"resume={newest}"], tmp_path / "other")
    with caplog.at_level("WARNING"):
        resumed = _train([*common, "trainer.max_steps=4"], run)
    assert "skipping step_4" in caplog.text
    again = {m["step"]: m["loss"] for m in resumed}
    assert again[3] == pytest.approx(full[3], rel=1e-6) and again[4] == pytest.approx(full[4], rel=1e-6)


def test_an_exploding_finite_loss_stops_like_a_nan(tmp_path, monkeypatch):
    from helios.stages import Stage1Base

    original = Stage1Base.forward_backward

    def exploding(self, model, batch, generator, shared=None, roles=None, *, step):
        return original(self, model, batch, generator, shared, _ScaledLoss(roles, 1e9), step=step)

    monkeypatch.setattr(Stage1Base, "forward_backward", exploding)
    with pytest.raises(
        FloatingPointError, match=r"the model loss is .* \(> trainer.max_loss=1e\+06\) at step 1"
    ):
        _train(["trainer.max_steps=2", "trainer.checkpoint_every=1"], tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*"))


def test_lora_takes_bf16_inputs_under_autocast_without_a_second_saved_copy():
    """Under bf16 autocast the LoRA layers use the bf16 activation as it is (peft's cast to the fp32 LoRA
    weight and autocast's cast back store a second copy of each adapted layer's input): the same outputs
    and gradients, fewer bytes saved for the backward."""
    from helios.model.lora import apply_lora, lora_inputs_uncast
    from helios.model.transformer import build_transformer

    cfg = compose(["model.lora.enabled=true"])
    model = apply_lora(build_transformer(cfg.model.transformer), cfg.model.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a LoRA that does something
            torch.nn.init.normal_(p, std=0.1)
        elif not p.requires_grad:
            p.data = p.data.bfloat16()
    c = model.config
    x = torch.randn(1, c.in_channels, 3, 8, 8)
    text = torch.randn(1, 8, c.text_dim)

    def step(uncast: bool):
        saved = {}

        def pack(t):  # each storage once
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            lora_inputs_uncast(model, uncast),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text)[0]
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads, sum(saved.values())

    out_cast, grads_cast, bytes_cast = step(False)
    out, grads, saved = step(True)
    assert torch.equal(out, out_cast)
    assert grads.keys() == grads_cast.keys() and any("lora_A" in n for n in grads)
    assert all(torch.equal(grads[n], grads_cast[n]) for n in grads)
    assert saved < bytes_cast


def test_frozen_base_in_bf16_keeps_diffusers_fp32_modules(tmp_path):
    """With bf16 compute the frozen base is bf16 except the modules diffusers keeps in fp32 (time
    embedder, modulation tables, affine norms), the trainable weights fp32; the memory model counts
    the same bytes."""
    from helios.commands import memory_estimate
    from helios.trainer import Trainer

    overrides = ["trainer.precision=bf16", "model.lora.enabled=true", "validation.enabled=false"]
    cfg = compose([*overrides, "trainer.progress=false"])
    trainer = Trainer(cfg, tmp_path)
    trainer._build_data()
    trainer._build_model()
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    kept = {n for n, d in dtypes.items() if d == torch.float32}
    assert kept and any("time_embedder" in n for n in kept) and any("scale_shift_table" in n for n in kept)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in kept)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    frozen_bytes = sum(
        p.numel() * p.element_size() for p in trainer.model.parameters() if not p.requires_grad
    )
    (role,) = memory_estimate.build_roles(cfg, torch.bfloat16)
    assert sum(role.frozen) == frozen_bytes
    trainer.close()


def test_two_ranks_share_the_validation_prompts(tmp_path):
    """Under DDP each rank samples its share of the validation prompts (round-robin) and writes its
    videos; every prompt's metrics reach metrics.jsonl."""
    train_cli(
        [
            f"hydra.run.dir={tmp_path}",
            "trainer.max_steps=1",
            "trainer.checkpoint_every=0",
            "validation.enabled=true",
            "validation.prompts=[a red circle moving right,a blue square moving left]",
        ],
        nproc=2,
    )
    ranks = [json.loads((tmp_path / "samples" / f"step_1_{i}.json").read_text())["rank"] for i in (0, 1)]
    assert ranks == [0, 1]
    last = read_metrics(tmp_path)[-1]
    assert last["step"] == 1 and {"val/0/seam_ratio", "val/1/seam_ratio"} <= last.keys()


# ---------------------------------------------------------------- nothing lost: checkpoints, branches, disks
def _flip_a_byte(path: Path) -> None:
    """Bit rot that keeps the size: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_keep_last_one_never_deletes_the_only_good_checkpoint(tmp_path):
    """The newest checkpoint is corrupt (one byte, same size) and keep_last=1: the run falls back to step_2,
    the corrupt step_4 moves aside (kept), step_3 is saved and only then is step_2 rotated away; the next
    resume continues from step_3."""
    _train(["trainer.checkpoint_every=2", "trainer.keep_last=2", "trainer.max_steps=4"], tmp_path)
    _flip_a_byte(tmp_path / "checkpoints" / "step_4" / "trainable.safetensors")
    _train(["trainer.checkpoint_every=1", "trainer.keep_last=1", "trainer.max_steps=3"], tmp_path)
    assert [s for s, _ in list_complete(tmp_path)] == [3]
    (aside,) = (tmp_path / "checkpoints" / "abandoned").glob("*-from_step_2/step_4")
    assert (aside / MARKER).exists()
    again = _train(["trainer.checkpoint_every=1", "trainer.keep_last=1", "trainer.max_steps=4"], tmp_path)
    assert [m["step"] for m in again][-2:] == [3, 4]  # steps 1-3 logged before, step 4 by this run
    assert [s for s, _ in list_complete(tmp_path)] == [4]


def test_resuming_an_older_checkpoint_starts_a_branch_that_latest_follows(tmp_path):
    """resume=<older checkpoint> (what the divergence message advises) moves the newer checkpoints aside as
    an abandoned branch (kept byte for byte); rotation keeps the new branch and resume=latest continues it."""
    common = ["trainer.checkpoint_every=1", "trainer.keep_last=2", "optim.schedule=constant"]
    _train([*common, "trainer.max_steps=4"], tmp_path)
    root = tmp_path / "checkpoints"
    abandoned = (root / "step_4" / "trainable.safetensors").read_bytes()
    _train([*common, "trainer.max_steps=5", f"resume={root / 'step_3'}", "optim.lr=1e-5"], tmp_path)
    (aside,) = (root / "abandoned").glob("*-from_step_3/step_4")
    assert (aside / "trainable.safetensors").read_bytes() == abandoned
    assert [s for s, _ in list_complete(tmp_path)] == [4, 5]
    assert (root / "step_4" / "trainable.safetensors").read_bytes() != abandoned  # the new branch's
    _train([*common, "trainer.max_steps=6", "optim.lr=1e-5"], tmp_path)
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["from"] == str(root / "step_5")


def test_a_full_disk_during_a_save_is_one_line_and_a_rerun_continues(tmp_path):
    """A write cut short by the file system (a file-size limit: the checkpoint's files exceed it) fails with
    one line naming the cause and the intact checkpoint, exit 2, the disk as it was before the save; the
    same command without the limit then continues from that checkpoint."""
    import resource

    common = ["trainer.checkpoint_every=2", f"hydra.run.dir={tmp_path}"]
    train_cli([*common, "trainer.max_steps=2"])
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    limit = 3 << 20  # below state.pt (AdamW moments of the 1.15M-parameter tiny DiT), above everything else

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "train_helios.py", "validation.enabled=false", "trainer.progress=false", *common,
         "trainer.max_steps=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=cap,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step_4 was not saved: the write was cut short"), last
    assert "file-size limit" in last and f"{tmp_path}/checkpoints/step_2, is intact" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    train_cli([*common, "trainer.max_steps=4"])
    assert [s for s, _ in list_complete(tmp_path)] == [2, 4]


def test_divergence_advice_names_the_newest_checkpoint_whose_weights_did_not_blow_up(tmp_path):
    """A learning rate of 1e10 blows the weights up at the first update (finite, so step_3 is saved) and the
    loss turns NaN a step later: the message says step_3 is already affected and names step_2, which a
    resume with a sane learning rate continues from."""
    common = ["trainer.checkpoint_every=1", "optim.schedule=constant"]
    _train([*common, "trainer.max_steps=2"], tmp_path)
    with pytest.raises(FloatingPointError) as err:
        _train([*common, "trainer.max_steps=8", "optim.lr=1e10"], tmp_path)
    message = str(err.value)
    good = tmp_path / "checkpoints" / "step_2"
    assert "is already affected" in message and f"resume={good}" in message, message
    resumed = _train([*common, "trainer.max_steps=4", f"resume={good}"], tmp_path)
    assert [m["step"] for m in resumed][-2:] == [3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in resumed)


def test_a_config_change_that_resume_refuses_stops_before_anything_is_built(tmp_path, monkeypatch):
    """A changed LoRA rank is named as a config error at start-up, not as a weight shape mismatch."""
    from helios.config.schema import ConfigError

    _train(["trainer.max_steps=1", "trainer.checkpoint_every=1", "model.lora.enabled=true"], tmp_path)
    monkeypatch.setattr(Trainer, "_build_data", lambda self: pytest.fail("data built before the check"))
    with pytest.raises(ConfigError, match="cannot change on resume") as err:
        _train(["trainer.max_steps=2", "model.lora.enabled=true", "model.lora.rank=4"], tmp_path)
    assert err.value.key == "model.lora.rank"


def test_a_second_run_in_a_live_run_dir_is_refused_naming_the_holder(tmp_path):
    from helios.infra.run_lock import RunDirBusy, RunLock

    holder = RunLock(tmp_path)
    holder.acquire()  # a live run: this very process
    try:
        with pytest.raises(
            RunDirBusy, match=rf"run dir {tmp_path} is in use by another live run .*pid {os.getpid()}"
        ):
            _train(["trainer.max_steps=1"], tmp_path)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.release()
    _train(["trainer.max_steps=1"], tmp_path)  # released: the run dir is free again


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    """Hydra would fail with a traceback opening its log file there: the entry says so first, exit 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "train_helios.py", f"hydra.run.dir={blocker}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = f"error: hydra.run.dir={blocker}/run: cannot write there (Not a directory): choose another"
    assert proc.stderr.strip() == expected + " folder"


def test_help_lists_what_applies_to_training_in_one_screen():
    proc = subprocess.run(
        [sys.executable, "train_helios.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) < 40, proc.stdout
    for line in (
        "stage      1 (Base)",
        "parallel   ddp (default), zero2, zero3",
        "--cfg job",
        "-m helios.train",
    ):
        assert line in proc.stdout, line
    assert "sampler:" not in proc.stdout and "clip:" not in proc.stdout  # generate's and prepare's groups


def test_no_text_encoder_is_held_while_training_runs(tmp_path, monkeypatch):
    """The validation prompts are encoded once at start-up, before the models are built; by the time
    validation samples, the text encoder is gone (issue #32: 21 GiB of fp32 UMT5-XXL on every GPU)."""
    import gc
    import weakref

    from helios import validation
    from helios.trainer import Trainer
    from tests.helpers.runs import train_in_process

    events, encoders, alive_at_sampling = [], [], []
    build_encoder, build_model, generate = (
        validation.build_text_encoder,
        Trainer._build_model,
        validation.generate_video,
    )

    def spy_encoder(cfg):
        tokenizer, encoder = build_encoder(cfg)
        events.append("text encoder")
        encoders.append(weakref.ref(encoder))
        return tokenizer, encoder

    def spy_model(self, *args, **kwargs):
        events.append("models")
        return build_model(self, *args, **kwargs)

    def spy_generate(*args, **kwargs):
        gc.collect()
        alive_at_sampling.append([ref() is not None for ref in encoders])
        assert kwargs["prompt_embeds"] is not None and args[2] is None and args[3] is None
        return generate(*args, **kwargs)

    monkeypatch.setattr(validation, "build_text_encoder", spy_encoder)
    monkeypatch.setattr(Trainer, "_build_model", spy_model)
    monkeypatch.setattr(validation, "generate_video", spy_generate)
    overrides = [
        "validation.enabled=true",
        "validation.every=1",
        "trainer.max_steps=2",
        "validation.num_frames=9",
    ]
    metrics = train_in_process([*overrides, "trainer.checkpoint_every=0"], tmp_path)
    assert events == ["text encoder", "models"]
    assert alive_at_sampling and not any(any(alive) for alive in alive_at_sampling)
    assert any(k.startswith("val/0/") for m in metrics for k in m)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_the_trainer_puts_a_stages_model_on_the_device_unless_the_stage_places_it(
    tmp_path, monkeypatch, stage
):
    """Stages 1-2 leave placement to the trainer, which moves the whole model to the rank's device (meta
    stands in for the GPU); stage 3 places its roles itself (the offload pool)."""
    from helios import trainer as trainer_module
    from helios.trainer import Trainer

    # the initial weights' statistics read values, which meta tensors do not have
    monkeypatch.setattr(trainer_module, "weight_stats", lambda tensors: {"rms": 0.0})
    monkeypatch.setattr(trainer_module, "model_tensors", lambda model, full: {"trainable": {}})
    trainer = Trainer(compose([f"stage={stage}", "validation.enabled=false"]), tmp_path)
    try:
        trainer.dist = dataclasses.replace(trainer.dist, device=torch.device("meta"))
        trainer._build_model()
        assert {p.device.type for p in trainer.model.parameters()} == {"meta"}
    finally:
        trainer.close()
