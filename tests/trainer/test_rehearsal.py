"""The README's 14B recipe, rehearsed on CPU against tiny models saved in the published layouts.

Every row of the README's recipe table (between the ``recipe:start`` / ``recipe:end`` markers) runs
command for command: ``/models/...`` become the fixture directories written by ``helios.fixtures``,
``torchrun --nproc_per_node=8`` becomes two processes, and only sizes change (64x64 clips, 2 steps, a
global batch that gives gradient accumulation 2). The phases rotate ``parallel=ddp|zero2|zero3``. Then
every hand-off is checked by value: a phase started with ``init_from`` begins from exactly the function
the previous phase ended with; the reloaded, exported and generated stage-3 model equals the in-memory EMA
generator; each export runs unchanged in diffusers' pipelines and gives our sampler's latents.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helios.config import compose
from helios.core.history import HistoryLayout

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "trainer.max_steps=2",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
    "trainer.progress=false",
    "validation.num_frames=9",
]
# What the rehearsal changes per row: sizes (and which parallel backend runs that phase).
SIZES = {
    "prepare": ["clip.height=64", "clip.width=64"],
    "1-init": [*COMMON, "trainer.global_batch_size=8", "validation.sampler.steps=[3]", "parallel=ddp"],
    "1-post": [*COMMON, "trainer.global_batch_size=8", "validation.sampler.steps=[3]", "parallel=zero2"],
    # stage 2 counts stage-samples: 2-init's clip is 4 of them ([1, 2, 1]), 2-post's 3
    "2-init": [*COMMON, "trainer.global_batch_size=16", "validation.sampler.steps=[2,2,2]", "parallel=zero3"],
    "2-init-released": [
        *COMMON,
        "trainer.global_batch_size=16",
        "validation.enabled=false",
        "parallel=zero2",
    ],
    "2-post": [*COMMON, "trainer.global_batch_size=12", "validation.sampler.steps=[2,2,2]", "parallel=ddp"],
    "ode-pairs": ["sampler.steps=[2,2,2]"],
    "3-ode": [*COMMON, "trainer.global_batch_size=4", "parallel=zero3"],
    "3-post": [
        *COMMON,
        "trainer.global_batch_size=4",
        "distill.gan.start_step=0",
        "distill.ema_start=0",
        "distill.ttur=1",  # the generator updates at both steps: the EMA (then an average) is not the raw G
        "distill.gan.dim=32",  # heads of 768 channels on the tiny DiT: 100 s a step on 2 CPU cores
        "optim.lr=1e-3",  # 2e-6 moves the tiny generator by ~1e-5: its EMA could not be told from it
        "parallel=zero2",
        "parallel.roles.critic=zero3",  # the shared teacher base partitioned, the real score on it
    ],
    "export-base": [],
    "export-mid": [],
    "export-distilled": [],
    "generate": ["height=64", "width=64"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def recipe() -> list[tuple[str, str]]:
    """(step, command) rows of the README's recipe table."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- recipe:start -->")[1].split("<!-- recipe:end -->")[0]
    return re.findall(r"^\| ([\w-]+) \| `(.+)` \|$", block, re.M)


def _local(value: str, fx: Path, work: Path) -> str:
    if value.startswith("/models/"):
        return str(fx / value.removeprefix("/models/"))
    if value == "/data/videos":
        return str(fx / "videos")
    if value.startswith("/data/"):
        return str(work / "data" / value.removeprefix("/data/"))
    if value.startswith(("runs/", "exports/")) or value.endswith(".mp4"):
        return str(work / value)
    return value


def localize(command: str, fx: Path, work: Path) -> list[str]:
    """A README command on this machine: two processes, paths into the fixtures and the work dir."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        assert argv[1] == "--nproc_per_node=8", command
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        argv = argv[2:]
    else:
        assert argv[0] == "python", command
        launcher, argv = [sys.executable], argv[1:]
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}={_local(value, fx, work)}" if eq else arg)
    out = [str(ROOT / "train_helios.py") if a == "train_helios.py" else a for a in out]
    return launcher + out


def run(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert out.returncode == 0, " ".join(argv) + "\n" + out.stdout[-3000:] + out.stderr[-6000:]
    return out


def overrides(step: str, fx: Path, work: Path) -> list[str]:
    """The Hydra overrides of a training row, localized, for an in-process build (one process, DDP)."""
    command = dict(recipe())[step]
    argv = localize(command, fx, work)
    args = argv[argv.index(str(ROOT / "train_helios.py")) + 1 :]
    sizes = [a for a in SIZES[step] if not a.startswith("parallel")]
    return [*args, *sizes, "parallel=ddp", "validation.enabled=false"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    fx = tmp_path_factory.mktemp("fixtures")
    run([sys.executable, "-m", "helios.fixtures", f"output={fx}"], cwd=fx)
    return fx


@pytest.fixture(scope="module")
def chain(fixtures, tmp_path_factory):
    work = tmp_path_factory.mktemp("rehearsal")
    timings = {}
    for step, command in recipe():
        t0 = time.monotonic()
        run(localize(command, fixtures, work) + SIZES[step], cwd=work)
        timings[step] = round(time.monotonic() - t0, 1)
    print("rehearsal timings (s):", json.dumps(timings))
    return SimpleNamespace(fx=fixtures, work=work, runs=work / "runs", exports=work / "exports")


def _inputs(layout: HistoryLayout, text_dim: int = 32, hw: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    history = torch.randn(1, 16, layout.num_history, hw, hw, generator=gen)
    anchor = torch.randn(1, 16, 1, hw, hw, generator=gen)
    return dict(
        hidden_states=torch.randn(1, 16, layout.window, hw, hw, generator=gen),
        timestep=torch.tensor([600.0]),
        encoder_hidden_states=torch.randn(1, 512, text_dim, generator=gen),
        **layout.model_inputs(history, anchor),
    )


@torch.no_grad()
def _out(model: torch.nn.Module, layout: HistoryLayout) -> torch.Tensor:
    return model.eval()(**_inputs(layout), return_dict=False)[0].float()


# ----------------------------------------------------------------------------- fast: fixtures and table


def test_recipe_table_is_what_the_tier_runs():
    rows = recipe()
    assert [step for step, _ in rows] == list(SIZES)
    for step, command in rows:
        if "train_helios.py" in command:
            assert (
                command.startswith("torchrun --nproc_per_node=8 train_helios.py")
                and "hydra.run.dir=" in command
            )
            assert not any(a.startswith(("trainer.", "parallel")) for a in shlex.split(command)), step
    backends = {a for step in SIZES for a in SIZES[step] if a.startswith("parallel=")}
    assert backends == {"parallel=ddp", "parallel=zero2", "parallel=zero3"}


def test_published_directories_load_as_users_load_them(fixtures):
    from diffusers import (
        DiffusionPipeline,
        HeliosDMDScheduler,
        HeliosPipeline,
        HeliosPyramidPipeline,
        WanPipeline,
    )

    from helios.config.schema import TransformerConfig
    from helios.loading import load_for_inference
    from helios.model.transformer import build_transformer

    expected = {
        "Wan2.1-T2V-14B-Diffusers": WanPipeline,
        "Helios-Base": HeliosPipeline,
        "Helios-Mid": HeliosPyramidPipeline,
        "Helios-Distilled": HeliosPyramidPipeline,
    }
    for name, cls in expected.items():
        pipe = DiffusionPipeline.from_pretrained(fixtures / name)
        assert type(pipe) is cls, name
    distilled = DiffusionPipeline.from_pretrained(fixtures / "Helios-Distilled")
    assert isinstance(distilled.scheduler, HeliosDMDScheduler) and distilled.config.is_distilled
    assert DiffusionPipeline.from_pretrained(fixtures / "Helios-Mid").config.is_cfg_zero_star
    config = json.loads((fixtures / "Helios-Base" / "transformer" / "config.json").read_text())
    for key in ("guidance_cross_attn", "zero_history_timestep", "has_multi_term_memory_patch"):
        assert config[key] is True, key
    # model=helios14b's loader (stages 2 and 3) on a published directory
    model = build_transformer(
        TransformerConfig(source="helios", path=str(fixtures / "Helios-Base"), subfolder="transformer")
    )
    from safetensors.torch import load_file

    (stored,) = (fixtures / "Helios-Base" / "transformer").glob("*.safetensors")
    params = dict(model.named_parameters())
    for name, tensor in load_file(str(stored)).items():  # every published tensor, as stored (bf16 -> fp32)
        torch.testing.assert_close(params[name].data, tensor.float(), rtol=0, atol=0)
    # the three published models are different weights (a test can tell which one was loaded)
    layout = HistoryLayout(16, 2, 1, 9)
    helios = ("Helios-Base", "Helios-Mid", "Helios-Distilled")
    outs = [_out(load_for_inference(fixtures / n, torch.device("cpu")).transformer, layout) for n in helios]
    assert (outs[0] - outs[1]).abs().max() > 1e-2 and (outs[1] - outs[2]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="WanTransformer3DModel, not a Helios model"):
        load_for_inference(fixtures / "Wan2.1-T2V-14B-Diffusers", torch.device("cpu"))


def test_memory_model_counts_the_published_directories_as_they_load(fixtures):
    """``python -m helios.memory`` on a published Helios directory (the README's command, model=helios14b):
    the shapes come from its config.json files, so every count equals the models the directory loads
    into: the transformer's parameters (the stage-3 critic's base with its LoRA), the VAE's weights, the
    text encoder's weights; and the command runs as written."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from helios.commands import memory_estimate
    from helios.model import apply_lora, build_transformer
    from helios.stages import STAGES

    base = fixtures / "Helios-Base"
    paths = [f"model.transformer.path={base}", f"distill.teacher={base}", f"init_from={base}", "data=/d"]
    overrides = ["stage=3", "stage3=post", "model=helios14b", *paths, "validation.enabled=true"]
    cfg = compose(overrides)
    roles = {r.name: r for r in memory_estimate.build_roles(cfg, torch.float32)}
    stage = STAGES[3](cfg)
    for name, lora in stage.role_loras().items():
        model = build_transformer(cfg.model.transformer)
        model = apply_lora(model, lora) if lora is not None else model.requires_grad_(False)
        assert roles[name].trainable == sum(p.numel() for p in model.parameters() if p.requires_grad), name
        assert sum(roles[name].frozen) == 4 * sum(
            p.numel() for p in model.parameters() if not p.requires_grad
        )
    vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae")
    assert sum(p.numel() for p in memory_estimate.build_vae_meta(cfg).parameters()) == sum(
        p.numel() for p in vae.parameters()
    )
    encoder = UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder")
    assert memory_estimate.text_encoder_bytes(cfg) == 4 * sum(p.numel() for p in encoder.parameters())
    out = subprocess.run([sys.executable, "-m", "helios.memory", *overrides, "world_size=2", "height=64",
                          "width=64"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.fullmatch(r"peak_gib_per_gpu=\d+\.\d host_gib_per_node=\d+\.\d", out.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- the chain


def test_recipe_runs_two_processes_every_backend_with_accumulation(chain):
    from helios.infra.checkpoint import list_complete
    from helios.infra.resolve import resolve_grad_accum

    for step in SIZES:
        if "train_helios.py" not in dict(recipe())[step]:
            continue
        run_dir = chain.runs / {"2-init-released": "s2-init-released"}.get(step, "s" + step)
        cfg = compose_saved(run_dir)
        (last, ckpt), *_ = reversed(list_complete(run_dir))
        assert last == 2, step
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["world_size"] == 2, step
        assert resolve_grad_accum(cfg, 2) == 2, step
        assert (ckpt / "zero").is_dir() == (cfg.parallel.backend != "ddp"), step
        losses = [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
        assert len(losses) == 2, step
    # sources are pinned: absolute paths, a run dir becomes the exact checkpoint it was at
    post = compose_saved(chain.runs / "s3-post")
    assert post.init_from == str((chain.runs / "s3-ode" / "checkpoints" / "step_2").resolve())
    assert post.distill.teacher == str((chain.runs / "s1-post" / "checkpoints" / "step_2").resolve())
    assert post.model.transformer.path == str((chain.fx / "Helios-Base").resolve())
    report = json.loads((chain.work / "long.json").read_text())
    assert report["frames"] >= 240 and (chain.work / "long.mp4").stat().st_size > 0


def compose_saved(run_dir: Path):
    from omegaconf import OmegaConf

    from helios.config.load import load_config

    return load_config(OmegaConf.load(run_dir / "config.yaml"))


def _trainer_model(step: str, chain, probe: Path):
    """The model a phase starts training from, built in-process exactly as the row builds it."""
    from helios.trainer import Trainer

    trainer = Trainer(compose(overrides(step, chain.fx, chain.work)), probe)
    try:
        trainer._build_data()
        trainer._build_model()
        model = trainer.model
        return (model.generator if step.startswith("3-") else model), HistoryLayout.from_config(
            trainer.cfg.history
        )
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "previous,step",
    [("s1-init", "1-post"), ("s1-post", "2-init"), ("s2-init", "2-post"), ("s3-ode", "3-post")],
)
def test_init_from_starts_from_the_function_the_previous_phase_ended_with(chain, previous, step, tmp_path):
    from helios.loading import load_checkpoint_model
    from helios.model.transformer import build_transformer

    ended, prev_cfg, _ = load_checkpoint_model(chain.runs / previous, "raw")
    started, layout = _trainer_model(step, chain, tmp_path / "probe")
    want, got = _out(ended, layout), _out(started, layout)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the hand-off carries something: the previous phase's function differs from its published base
    base = build_transformer(prev_cfg.model.transformer)
    assert (want - _out(base, layout)).abs().max() > 1e-3


def test_stage3_reloaded_exported_and_generated_model_is_the_in_memory_ema(chain, tmp_path):
    from diffusers import HeliosTransformer3DModel

    from helios.commands.diffusers_export import export
    from helios.config.schema import ExportConfig
    from helios.loading import load_checkpoint_model, load_for_inference
    from helios.trainer import Trainer

    # the generator updated at both steps: the EMA (a copy after the first update, then averaged)
    # differs from the raw generator
    cfg = compose([*overrides("3-post", chain.fx, chain.work), "distill.ttur=1"])
    trainer = Trainer(cfg, tmp_path / "s3-post")
    try:
        trainer.run()
        ema = trainer.ema.average["generator"].gather()
        in_memory = trainer.stage.sampling_model(trainer.model, ema=ema)
        layout = HistoryLayout.from_config(cfg.history)
        want = _out(in_memory, layout)
        raw = _out(trainer.model.generator, layout)
    finally:
        trainer.close()
    assert (want - raw).abs().max() > 0  # the EMA is not the raw generator
    reloaded, _, _ = load_checkpoint_model(tmp_path / "s3-post", "ema")
    torch.testing.assert_close(_out(reloaded, layout), want, rtol=1e-5, atol=1e-6)
    export(ExportConfig(checkpoint=str(tmp_path / "s3-post"), output=str(tmp_path / "export"), weights="ema"))
    exported = HeliosTransformer3DModel.from_pretrained(tmp_path / "export", subfolder="transformer")
    torch.testing.assert_close(_out(exported, layout), want, rtol=1e-5, atol=1e-6)
    for source in (tmp_path / "s3-post", tmp_path / "export"):  # what helios.generate samples with
        loaded = load_for_inference(source, torch.device("cpu"))
        torch.testing.assert_close(_out(loaded.transformer, layout), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "export_name,run_name,weights",
    [
        ("helios-base", "s1-post", "raw"),
        ("helios-mid", "s2-post", "raw"),
        ("helios-distilled", "s3-post", "ema"),
    ],
)
def test_exports_sample_in_diffusers_as_stored_and_give_our_latents(chain, export_name, run_name, weights):
    from diffusers import DiffusionPipeline, HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline

    from helios.loading import load_checkpoint_model
    from tests.helpers.export_parity import export_and_our_latents

    pipe = DiffusionPipeline.from_pretrained(chain.exports / export_name)
    # diffusers' side from what the export stored (its scheduler, flags and call), ours from the run's config
    model, cfg, _ = load_checkpoint_model(chain.runs / run_name, weights)
    s = cfg.validation.sampler
    assert type(pipe) is (HeliosPipeline if s.kind == "unipc" else HeliosPyramidPipeline)
    if s.kind == "dmd":
        assert isinstance(pipe.scheduler, HeliosDMDScheduler) and pipe.config.is_distilled
    ref, our_latents, call = export_and_our_latents(chain.exports / export_name, pipe, cfg)
    # the reference's negative prompt, as trained
    assert call["negative_prompt"] == (s.negative_prompt if s.kind != "dmd" else None)
    ours = our_latents(model)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    if weights == "ema":  # the export holds the EMA, not the raw generator (which samples other latents)
        raw, _, _ = load_checkpoint_model(chain.runs / run_name, "raw")
        assert (our_latents(raw) - ref).abs().max() > 1e-3
