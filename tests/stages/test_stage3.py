"""Stage 3: the tiny self-contained runs, TTUR step counts per role, EMA, resume, the whole chain."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.sampling.pipeline import sections_for
from helios.world.measures import caption_metrics
from tests.helpers.runs import train_in_process as _train

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_post_counts_optimizer_steps_per_role_and_keeps_an_ema(tmp_path):
    metrics = _train(
        [
            "stage=3",
            "trainer.max_steps=11",
            "trainer.checkpoint_every=11",
            "distill.ttur=5",
            "distill.gan.start_step=3",
            "distill.ema_start=2",
        ],
        tmp_path,
    )
    last = metrics[-1]
    # critic every iteration, generator at iterations 0, 5, 10: exactly one optimizer step each time
    assert (last["opt_steps_critic"], last["opt_steps_generator"]) == (11, 3)
    assert [m["update_g"] for m in metrics] == [float(i % 5 == 0) for i in range(11)]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["loss_flow"]) for m in metrics)
    gan = [m for m in metrics if m["step"] > 3]
    assert all(isinstance(m["loss_gan_d"], float) for m in gan)  # GAN on from its start step ...
    assert all(m["loss_gan_d"] is None for m in metrics[:3])  # ... and not before (JSON null)
    # each role's loss and learning rate on the dashboard; the generator's only where it updated
    assert all(m["lr/critic"] == pytest.approx(2e-4) and m["lr/generator"] > 0 for m in metrics)
    assert [m["loss/generator"] is not None for m in metrics] == [i % 5 == 0 for i in range(11)]
    assert all(m["loss/critic"] == pytest.approx(m["loss"] - (m["loss/generator"] or 0.0)) for m in metrics)
    assert isinstance(metrics[5]["loss_gan_g"], float) and isinstance(metrics[5]["loss_dmd"], float)
    assert all(m["first_section"] in (0.0, 1.0) for m in metrics)  # one rank: its own decision, logged
    ema = load_file(str(tmp_path / "checkpoints" / "step_11" / "ema.safetensors"))
    trainable = load_file(str(tmp_path / "checkpoints" / "step_11" / "trainable.safetensors"))
    assert ema and all(k.startswith("generator.") and k in trainable for k in ema)
    assert any(not torch.equal(ema[k], trainable[k]) for k in ema)  # the average lags the weights


def test_tiny_post_resumes_exactly(tmp_path):
    common = [
        "stage=3",
        "trainer.checkpoint_every=3",
        "trainer.max_steps=6",
        "distill.gan.start_step=1",
        "distill.ema_start=1",
        "seed=4",
    ]
    full = _train(common, tmp_path / "full")
    _train([*common, "trainer.max_steps=3"], tmp_path / "split")
    resumed = {m["step"]: m["loss"] for m in _train(common, tmp_path / "split")}
    for m in full[3:]:
        assert resumed[m["step"]] == pytest.approx(m["loss"], rel=1e-5, abs=1e-6), m["step"]


def test_tiny_job_scores_with_a_base_and_starts_the_generator_from_a_mid(tmp_path):
    """As the reference recipe: the real / fake scores' base is a stage-1 model (Helios-Base: trained on
    every noise level at full resolution), the generator starts from a stage-2 model (Helios-Mid) made
    from it, which also samples the ODE pairs. (A stage-2 model as the real score is asked for noise
    levels its full-resolution stage never saw; the toy experiment's DMD then moved away from the
    teacher.)"""
    from helios.loading import load_train_config

    _train(["stage=3", "stage3=tiny_ode", "trainer.max_steps=1", "trainer.checkpoint_every=1"], tmp_path)
    cfg = load_train_config(tmp_path / "checkpoints" / "step_1")
    base = load_train_config(Path(cfg.distill.teacher))
    mid = load_train_config(Path(cfg.distill.generator_init))
    assert (base.stage, mid.stage) == (1, 2)
    assert Path(mid.init_from).resolve() == Path(cfg.distill.teacher).resolve()
    pairs = json.loads((Path(cfg.distill.ode_pairs) / "report.json").read_text())
    assert Path(cfg.distill.generator_init).resolve().is_relative_to(Path(pairs["teacher"]).resolve())


def test_tiny_ode_phase_regresses_onto_teacher_pairs(tmp_path):
    """Staged ODE Init on the tiny Mid's own trajectories: in every pyramid stage the regression error of
    the last third of the steps is below the first third's (each stage has its own scale)."""
    metrics = _train(
        ["stage=3", "stage3=tiny_ode", "trainer.max_steps=90", "trainer.checkpoint_every=0"], tmp_path
    )
    assert all(m["loss"] == m["loss_ode"] for m in metrics)
    for k in range(3):
        losses = [m["loss_ode"] for m in metrics if m["ode_stage"] == k]
        third = len(losses) // 3
        assert third >= 5 and sum(losses[-third:]) < 0.8 * sum(losses[:third]), (k, losses)


def test_real_recipe_needs_its_teacher():
    from helios.config import ConfigError
    from helios.stages import Stage3Distilled

    no_teacher = compose(["stage=3", "stage3=post", "model.transformer.path=/m", "data.path=/d"])
    with pytest.raises(ConfigError, match=r"distill\.teacher") as err:
        Stage3Distilled(no_teacher).setup(Path("/d"), None)  # at start-up, before any model is built
    assert err.value.key == "distill.teacher"
    # what to give, and where the tiny default's comes from
    assert "needs the teacher (Helios-Base): a run dir, checkpoint or diffusers directory" in str(err.value)
    assert "(for the tiny model, train_helios.py makes a tiny one: bench/tiny_recipe.py)" in str(err.value)
    no_pairs = compose(
        ["stage=3", "stage3=ode", "model.transformer.path=/m", "data.path=/d", "distill.teacher=/t"]
    )
    with pytest.raises(ConfigError) as err:
        Stage3Distilled(no_pairs).setup(Path("/d"), None)
    assert err.value.key == "distill.ode_pairs"
    assert err.value.reason == "phase=ode needs ODE pairs: python -m helios.ode_pairs ..."
    cfg = compose(
        ["stage=3", "stage3=post", "model.transformer.path=/m", "data.path=/d", "distill.teacher=/t"]
    )
    d = cfg.distill
    assert (d.ttur, d.real_cfg, d.fake_lr, d.ema_start, d.gan.start_step) == (5, 4.0, 4e-7, 750, 1000)
    # the reference's stage 3: LoRA on the memory patches, none on the patch embedding; T2V 0.4 then
    # partial V2V 0.5; corrupt in its "random" mode with the generator's history saturated
    lora, h = cfg.model.lora, cfg.history
    assert (lora.memory_patch, lora.patch_embedding, lora.rank) == ("lora", False, 256)
    assert (h.tasks.t2v, h.tasks.i2v, h.tasks.v2v_partial) == (0.4, 0.0, 0.3)
    assert (h.corrupt.mode, h.corrupt.reference_p_noise, h.corrupt.saturation.enabled) == (
        "reference",
        0.9,
        True,
    )
    # Table 2's heads as the reference code placed them: blocks 5/15/25/35 and the output
    assert d.gan.layers == [5, 15, 25, 35] and d.gan.output_head and d.gan.r1_weighting == "reference"
    assert (d.gan.w_g, d.gan.w_d, d.gan.r1_lambda) == (
        5e-2,
        1e-2,
        100.0,
    )
    assert cfg.optim.betas == [0.0, 0.999] and cfg.optim.grad_clip == 10.0 and cfg.trainer.max_steps == 2250
    c = cfg.history.corrupt
    assert (c.p_exposure, c.p_noise, c.p_downsample, c.p_clean) == (0.4, 0.4, 0.0, 0.2)


def test_sections_cover_the_requested_frames():
    for frames in (1, 9, 33, 40, 60, 1440):
        latent = sections_for(frames, 9) * 9
        assert 4 * (latent - 1) + 1 >= frames


@pytest.mark.slow
def test_the_tiny_chain_script(tmp_path):
    out = tmp_path / "chain"
    proc = subprocess.run(
        ["bash", "launch/tiny_chain.sh", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "STEPS": "4", "PAIRS": "8", "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "helios_distilled" / "helios_export.json").read_text())["pipeline"] == (
        "HeliosPyramidPipeline"
    )
    assert json.loads((out / "distilled.json").read_text())["frames"] == 60
    for run in ("s1", "s2", "s3_ode", "s3_post"):
        assert (out / run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_stage3_two_process_ddp_keeps_roles_identical(tmp_path):
    # the tiny teacher is built by one process (several ranks are told to build it first)
    _train(["stage=3", "trainer.max_steps=1", "trainer.checkpoint_every=0"], tmp_path / "warm")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "tests/helpers/ddp_probe.py",
            str(tmp_path),
            "stage=3",
            "trainer.batch_size=2",
            "distill.gan.start_step=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert any(k.startswith("generator.") for k in w0) and any(k.startswith("fake.") for k in w0)
    assert any(k.startswith("heads.") for k in w0)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    # the bases were read once per node (parallel.node_shared_weights): rank 0 read them into /dev/shm, rank 1
    # read nothing and maps the same files; the trainable weights are each rank's own (issue #32)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["loads"]) >= 2 and r1["loads"] == []
    assert r0["frozen"] and r0["frozen"] == r1["frozen"] and None not in r0["frozen"]
    assert not set(r0["trainable"]) & set(r0["frozen"]) and not set(r1["trainable"]) & set(r1["frozen"])


def test_cached_gan_gradient_equals_plain_autograd(tmp_path):
    """Cache Grad for GAN (§4.2): the generator's gradients are those of plain autograd; the GAN heads' and
    the fake score's are the critic's losses alone either way (the generator's GAN loss leaves them
    frozen)."""
    from helios.trainer import Trainer

    grads, heads, fakes, values = {}, {}, {}, {}
    # w_G large so that the GAN term is a visible part of the generator gradient (fresh heads are weak)
    for cached, w_g in ((False, 50.0), (True, 50.0), ("no_gan", 0.0)):
        cfg = compose(
            [
                "stage=3",
                "distill.gan.start_step=0",
                f"distill.cache_gan_grad={cached is True}",
                f"distill.gan.w_g={w_g}",
                "validation.enabled=false",
                "trainer.progress=false",
            ]
        )
        trainer = Trainer(complete_tiny_distill(cfg), tmp_path / str(cached))
        trainer._build_data()
        trainer._build_model()
        batch = next(
            iter(
                torch.utils.data.DataLoader(
                    [trainer.dataset[(i, 0)] for i in range(2)],
                    batch_size=2,
                    collate_fn=trainer.dataset.collate,
                )
            )
        )
        losses, stats = trainer.stage.forward_backward(  # the backwards run inside (plain autograd)
            trainer.model,
            batch,
            torch.Generator().manual_seed(7),
            step=0,  # a generator iteration, GAN on
        )
        assert set(losses) == {"generator", "critic"}
        assert math.isfinite(stats["loss_gan_g"])
        values[cached] = float(losses["generator"])
        grads[cached] = {
            n: p.grad.clone() for n, p in trainer.model.generator.named_parameters() if p.grad is not None
        }
        heads[cached] = {
            n: p.grad.clone() for n, p in trainer.model.heads.named_parameters() if p.grad is not None
        }
        fakes[cached] = {
            n: p.grad.clone() for n, p in trainer.model.fake.named_parameters() if p.grad is not None
        }
        trainer.close()
    assert values[True] == pytest.approx(
        values[False], rel=1e-5
    )  # the logged loss too, not only its gradient
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-7)
    # the GAN heads' gradients are the critic's loss alone: the generator's GAN loss leaves them frozen
    assert heads[True].keys() == heads[False].keys() and heads[True]
    for name, g in heads[False].items():
        torch.testing.assert_close(heads[True][name], g, rtol=1e-5, atol=1e-8)
    # so are the fake score's (its LoRA): the GAN loss flows through it to the generator only
    assert fakes[True].keys() == fakes[False].keys() == fakes["no_gan"].keys() and fakes[True]
    for name, g in fakes["no_gan"].items():
        torch.testing.assert_close(fakes[False][name], g, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(fakes[True][name], g, rtol=1e-5, atol=1e-8)
    # and the GAN term does reach the generator (without it the gradients differ)
    assert any(not torch.allclose(grads["no_gan"][n], g, atol=1e-7) for n, g in grads[False].items())


def test_self_forcing_history_is_the_generators_own_rollout():
    """Table 5 "w Self-Forcing": sections rolled out from an empty history fill the buffer; each rollout
    sees the previous sections as history and the first generated frame as anchor."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3", "distill.history_source=self_forcing"]))
    layout = stage.layout  # tiny: history 4/2/1, window 3 -> 3 sections fill the 7-frame buffer
    seen = []

    def fake_rollout(generator, cond, shape, gen, grad, exits=None, first_section=False):
        assert not grad and exits is None  # no gradients, the full few-step schedule
        assert first_section == (len(seen) == 0)  # the first section is sampled with the doubled schedule
        seen.append(cond["latents_history_short"].clone())
        return torch.full(shape, float(len(seen)))

    stage.phase.rollout = fake_rollout
    shape = (1, 16, layout.window, 4, 4)
    cond = stage.phase.self_forcing_cond(None, {"encoder_hidden_states": torch.zeros(1, 8, 32)}, shape, None)
    assert len(seen) == 3
    assert seen[0].abs().sum() == 0  # the first section starts from an empty history (T2V)
    assert seen[1][0, 0, :, 0, 0].tolist() == [1.0, 1.0]  # anchor = first generated frame, 1x = newest
    assert seen[2][0, 0, :, 0, 0].tolist() == [1.0, 2.0]
    # final buffer: the last 7 generated frames [1, 2, 2, 2, 3, 3, 3] -> long 4 / mid 2 / short 1x + anchor
    assert cond["latents_history_short"][0, 0, :, 0, 0].tolist() == [1.0, 3.0]
    assert cond["latents_history_long"].shape[2] == 4 and cond["latents_history_mid"].shape[2] == 2


def test_self_forcing_history_is_built_on_the_prompts_device():
    """The rolled-out history buffer lives where the prompt does (the meta device stands in for a GPU
    here: a buffer built on the host would not concatenate with the generated sections)."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3", "distill.history_source=self_forcing"]))
    shape = (1, 16, stage.layout.window, 4, 4)

    def fake_rollout(generator, cond, shape, gen, grad, exits=None, first_section=False):
        assert {v.device.type for v in cond.values()} == {"meta"}
        return torch.zeros(shape, device="meta")

    stage.phase.rollout = fake_rollout
    prompt = {"encoder_hidden_states": torch.zeros(1, 8, 32, device="meta")}
    cond = stage.phase.self_forcing_cond(None, prompt, shape, None)
    assert {v.device.type for v in cond.values()} == {"meta"}
    assert cond["latents_history_long"].shape[2] == stage.layout.num_history - 3


def test_bidirectional_teacher_scores_one_segment_without_history_inputs():
    """Table 5 "w Bidirectional Teacher": the real score sees [re-noised real context, x_tau] as one clip
    of ``bidirectional_frames`` latent frames, with no history inputs; the x_tau part is returned."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(
        compose(["stage=3", "distill.real_score=bidirectional", "distill.bidirectional_frames=8"])
    )
    calls = []

    class Real(torch.nn.Module):
        def forward(self, hidden_states, timestep, return_dict, **kwargs):
            calls.append((hidden_states.shape[2], sorted(kwargs)))
            return (hidden_states * 2,)

    class Batch:
        latents = torch.randn(2, 16, stage.layout.clip_frames, 4, 4)

    xt = torch.randn(2, 16, stage.layout.window, 4, 4)
    tau5 = torch.full((2, 1, 1, 1, 1), 0.5)
    context = stage.phase.bidirectional_context(Batch, xt, tau5, torch.Generator().manual_seed(0))
    assert context.shape[2] == 8 - stage.layout.window  # 5 of the 7 history frames
    newest = stage.layout.split_clip(Batch.latents)[0][:, :, -context.shape[2] :]
    noise = torch.randn(context.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(context, 0.5 * newest + 0.5 * noise)  # re-noised to tau as x_tau was
    m = DistillModule(torch.nn.Identity(), real=Real())  # a separate real score
    v = stage.phase.real_velocity(m, xt, torch.full((2,), 500.0), {"encoder_hidden_states": 0}, context)
    assert calls == [(8, ["encoder_hidden_states"])] and torch.equal(v, xt * 2)
    assert stage.phase.bidirectional_context(Batch, xt, tau5, None) is not None
    # the batch's latents come from the host: the context is brought to x_tau's device (meta: the GPU)
    on_device = stage.phase.bidirectional_context(Batch, xt.to("meta"), tau5.to("meta"), None)
    assert on_device.device.type == "meta" and on_device.shape == context.shape
    stage.d.bidirectional_frames = stage.layout.window  # a segment no longer than x_tau: no context
    assert stage.phase.bidirectional_context(Batch, xt, tau5, None).shape[2] == 0
    stage.d.real_score = "history"
    assert stage.phase.bidirectional_context(Batch, xt, tau5, None) is None


@pytest.mark.parametrize(
    "ablation", ["distill.history_source=self_forcing", "distill.real_score=bidirectional"]
)
def test_stage3_ablations_train(tmp_path, ablation, monkeypatch):
    from helios.stages.distilled.post import PostPhase

    # self-forcing: every data history empty (T2V), which must not make its sections "first" sections
    tasks = ["history.tasks.t2v=1.0", "history.tasks.v2v_partial=0.0"] if "self_forcing" in ablation else []
    overrides = ["stage=3", "trainer.max_steps=2", "distill.gan.start_step=0", ablation, *tasks]
    contexts, real_velocity = [], PostPhase.real_velocity

    def recording(self, m, xt, t_tau, cond, context):
        contexts.append(context is not None)
        return real_velocity(self, m, xt, t_tau, cond, context)

    monkeypatch.setattr(PostPhase, "real_velocity", recording)
    metrics = _train(overrides, tmp_path)
    # the bidirectional teacher scores both CFG branches on [context, x_tau]; Helios-Base never has one
    assert len(contexts) == 2 and set(contexts) == {"bidirectional" in ablation}
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert math.isfinite(metrics[0]["loss_dmd"])  # the first iteration trains the generator (TTUR)
    if "self_forcing" in ablation:  # the generator makes its own history: never a doubled first section
        assert [m["first_section"] for m in metrics] == [0.0, 0.0]


def test_uncached_gan_gradient_trains_with_gradient_checkpointing(tmp_path):
    """``distill.cache_gan_grad=false`` with gradient checkpointing (on in every 14B config): the generator's
    GAN loss goes back through the frozen fake score, whose checkpointed forward must not be recomputed
    after its flags are restored. Same losses and weights as without checkpointing."""
    common = ["stage=3", "trainer.max_steps=2", "distill.gan.start_step=0", "distill.cache_gan_grad=false"]
    plain = _train([*common, "trainer.checkpoint_every=2"], tmp_path / "plain")
    ckpt = _train(
        [*common, "trainer.checkpoint_every=2", "model.transformer.gradient_checkpointing=true"],
        tmp_path / "gc",
    )
    assert plain[0]["update_g"] == 1.0 and isinstance(plain[0]["loss_gan_g"], float)
    assert [m["loss"] for m in ckpt] == pytest.approx([m["loss"] for m in plain], rel=1e-6)
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "step_2" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "gc" / "checkpoints" / "step_2" / "trainable.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


class _Recorder(torch.nn.Module):
    """A stand-in generator: v = w * x, recording (timestep, grid) per call and its output tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[float, tuple[int, int]]] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, return_dict=False, **_):
        self.calls.append((float(timestep[0]), tuple(hidden_states.shape[-2:])))
        out = self.w * hidden_states
        if out.requires_grad:
            out.retain_grad()
        self.outputs.append(out)
        return (out,)


@pytest.mark.parametrize("first_section", [True, False])
def test_rollout_uses_the_samplers_timesteps(first_section):
    """The stage-3 rollout (all steps) feeds the generator exactly the timesteps and grids the DMD sampler
    that validation, export and generate use feeds it: same shift per stage, same amplified first section."""
    from helios.sampling.pipeline import build_section_sampler
    from helios.stages import Stage3Distilled

    cfg = compose(["stage=3"])
    stage = Stage3Distilled(cfg)
    shape = (1, 16, stage.layout.window, 16, 16)
    cond = {"encoder_hidden_states": torch.zeros(1, 4, 32)}
    trained = _Recorder()
    with torch.no_grad():
        stage.rollout(
            trained, cond, shape, torch.Generator().manual_seed(0), grad=False, first_section=first_section
        )
    sampled = _Recorder()
    sampler = build_section_sampler(cfg.validation.sampler)
    x = sampler.initial_noise(shape, torch.Generator().manual_seed(0), torch.device("cpu"))
    sampler(lambda x, t, e: sampled(x, t)[0], x, cond["encoder_hidden_states"], None, None, first_section)
    assert trained.calls == sampled.calls
    assert len(trained.calls) == (12 if first_section else 6)  # 3 stages x 2 steps, doubled on the first


def test_the_rollouts_x0_is_the_flow_estimate_at_every_step():
    """x0 = x_t - sigma v at each step of each stage (the reference's DMD rollout): a generator whose
    velocity points exactly at a constant field gives that field back, whatever the exits."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))
    shape = (1, 16, stage.layout.window, 16, 16)
    cond = {"encoder_hidden_states": torch.zeros(1, 4, 32)}

    sigma_of = {}  # each step's timestep -> its stage-local sigma (the one the rollout's x0 uses)
    for k in range(3):
        grid = (*shape[:3], 16 // 2 ** (2 - k), 16 // 2 ** (2 - k))
        timesteps, sigmas = stage.rollout.stage_schedule(k, grid, False)
        sigma_of.update({float(t): float(s) for t, s in zip(timesteps, sigmas)})

    class Exact(torch.nn.Module):  # v = (x_t - x0) / sigma with x0 = 0.7 everywhere
        def forward(self, hidden_states, timestep, return_dict=False, **_):
            return ((hidden_states - 0.7) / sigma_of[float(timestep[0])],)

    for exits in (None, [0, 1, 0], [1, 0, 1]):
        x0 = stage.rollout(Exact(), cond, shape, torch.Generator().manual_seed(0), grad=False, exits=exits)
        torch.testing.assert_close(x0, torch.full(shape, 0.7), rtol=0, atol=1e-4)

    seen: list[torch.Tensor] = []

    class Recording(Exact):  # and the state each step is given
        def forward(self, hidden_states, timestep, return_dict=False, **_):
            seen.append(hidden_states.clone())
            return super().forward(hidden_states, timestep)

    # between two steps of a stage the state is its start re-noised to the next sigma around the x0
    # estimate: x_j = sigma_j start + (1 - sigma_j) x0, so x_j - x0 = sigma_j (start - x0)
    stage.rollout(Recording(), cond, shape, torch.Generator().manual_seed(0), grad=False)
    by_stage: dict[int, list[torch.Tensor]] = {}
    for x in seen:
        by_stage.setdefault(x.shape[-1], []).append(x)
    for states in by_stage.values():
        start = states[0]
        for x in states[1:]:
            sigma = float(((x - 0.7) * (start - 0.7)).sum() / ((start - 0.7) ** 2).sum())
            assert 0 < sigma < 1
            torch.testing.assert_close(x - 0.7, sigma * (start - 0.7), rtol=0, atol=1e-5)


def test_staged_backward_simulation_sends_gradient_through_every_stage():
    """Each stage stops at its exit step and hands its x0 on with the graph: the gradient of the final x0
    reaches stage k's exit forward when stage k+1 exits at its first step, and not otherwise (reference)."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))
    shape = (1, 16, stage.layout.window, 16, 16)
    cond = {"encoder_hidden_states": torch.zeros(1, 4, 32)}

    def grads(exits):
        gen = _Recorder()
        x0 = stage.rollout(gen, cond, shape, torch.Generator().manual_seed(0), grad=True, exits=exits)
        x0.square().sum().backward()
        return [
            (grid, out.grad is not None and bool(out.grad.abs().sum() > 0))
            for (_, grid), out in zip(gen.calls, gen.outputs)
        ]

    assert grads([0, 0, 0]) == [((4, 4), True), ((8, 8), True), ((16, 16), True)]
    # stage 1 exits at its second step: its first step ran without gradient, which cuts stage 0 off
    assert grads([1, 1, 0]) == [
        ((4, 4), False),
        ((4, 4), False),
        ((8, 8), False),
        ((8, 8), True),
        ((16, 16), True),
    ]


def test_real_score_unconditional_branch_is_the_prepared_negative_prompt(tmp_path):
    """Reference: CFG of the real score against its negative prompt, which helios.prepare encodes next to
    the empty prompt; distill.uncond=empty is the paper's plain CFG; distill.uncond=zeros is zero embeddings
    (caption dropout's input), which needs no file."""
    from helios.config.schema import REFERENCE_NEGATIVE_PROMPT
    from helios.data.prepare_job import NEGATIVE_PROMPT_FILE, load_empty_prompt
    from helios.data.synthetic import synthetic_shards
    from helios.model.encoders import build_text_encoder, encode_prompts
    from helios.stages import Stage3Distilled

    cfg = compose(["stage=3", "distill.teacher=/t"])
    shards = synthetic_shards(cfg, True)
    tok, text = build_text_encoder(cfg.model.text_encoder)
    n = cfg.model.text_encoder.max_sequence_length
    negative = encode_prompts(tok, text, [REFERENCE_NEGATIVE_PROMPT], n)
    empty = encode_prompts(tok, text, [""], n)
    batch_embeds = torch.randn(2, n, negative.shape[-1])  # a batch's prompt embeddings
    for uncond, want in (("negative", negative), ("empty", empty), ("zeros", torch.zeros_like(negative))):
        stage = Stage3Distilled(compose(["stage=3", "distill.teacher=/t", f"distill.uncond={uncond}"]))
        stage.setup(shards if uncond != "zeros" else tmp_path, None)  # zeros: no prepared file read
        torch.testing.assert_close(stage.phase.unconditional(batch_embeds), want.expand(2, -1, -1))
    assert not torch.equal(negative, empty) and empty.abs().sum() > 0
    # a shard set without the file names the fix
    (tmp_path / "empty_prompt_embeds.npy").write_bytes((shards / "empty_prompt_embeds.npy").read_bytes())
    assert load_empty_prompt(tmp_path, NEGATIVE_PROMPT_FILE) is None
    fix = "rerun helios.prepare with the same arguments (it adds the file without re-encoding the clips)"
    with pytest.raises(FileNotFoundError) as err:
        Stage3Distilled(cfg).setup(tmp_path, None)
    assert str(err.value) == f"{tmp_path} has no {NEGATIVE_PROMPT_FILE}: {fix} or use distill.uncond=empty"


def test_validation_samples_the_ema_in_place_and_puts_the_training_weights_back(tmp_path):
    """Validation writes the EMA into the generator (no copy of the generator and its base) and restores
    the training weights: its drift statistics equal the EMA model's sampled the same way, and the
    checkpoint saved right after it equals a run without validation."""
    from helios.loading import load_checkpoint_model
    from helios.model.encoders import build_text_encoder, build_vae
    from helios.sampling.pipeline import generate_video

    common = ["stage=3", "trainer.max_steps=6", "trainer.checkpoint_every=6", "distill.ema_start=1"]
    validated = _train([*common, "validation.enabled=true", "validation.every=0"], tmp_path / "val")
    _train(common, tmp_path / "plain")
    ckpt = "checkpoints/step_6/trainable.safetensors"
    a, b = load_file(str(tmp_path / "val" / ckpt)), load_file(str(tmp_path / "plain" / ckpt))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_model, cfg, _ = load_checkpoint_model(tmp_path / "val", "ema")
    v = cfg.validation
    tok, text = build_text_encoder(cfg.model.text_encoder)
    from helios.core.history import HistoryLayout

    h, w = 8, 8
    result = generate_video(
        ema_model,
        build_vae(cfg.model.vae),
        tok,
        text,
        HistoryLayout.from_config(cfg.history),
        v.sampler,
        [(0, v.prompts[0])],
        v.num_frames,
        h * 8,
        w * 8,
        torch.Generator().manual_seed(v.seed),
        cfg.model.text_encoder.max_sequence_length,
        adaptive_seed=v.seed,
        latent_format=cfg.data.latent_format,
    )
    last = validated[-1]
    assert last["val/0/seam_ratio"] == pytest.approx(result.stats["seams"]["ratio"], rel=1e-4)
    for key, value in result.stats["drift"]["max_abs_delta"].items():
        assert last[f"val/0/drift_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6)
    world = caption_metrics(result.frames[0], v.prompts[0])
    assert world
    for key, value in world.items():
        assert last[f"val/0/world_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6)


def _grads_seen_when(monkeypatch, method: str, role: str) -> list[bool]:
    """Records, each time the post phase's ``method`` starts, whether ``role``'s trainable parameters already
    have gradients (that role's backward ran before)."""
    from helios.stages.distilled.post import PostPhase

    seen: list[bool] = []
    original = getattr(PostPhase, method)

    def spy(self, m, *args):
        seen.append(any(p.grad is not None for p in getattr(m, role).parameters() if p.requires_grad))
        return original(self, m, *args)

    monkeypatch.setattr(PostPhase, method, spy)
    return seen


def test_generator_backward_runs_before_the_critic_forward(tmp_path, monkeypatch):
    """§4.2: the generator's and the critic's graphs are never alive together: on a generator iteration
    the generator's gradients exist (its backward ran) when the critic's forward starts."""
    seen = _grads_seen_when(monkeypatch, "critic_flow_loss", "generator")
    overrides = ["stage=3", "trainer.max_steps=2", "distill.ttur=2", "distill.gan.start_step=0"]
    _train([*overrides, "trainer.checkpoint_every=0"], tmp_path)
    assert seen == [True, False]  # step 0 updates the generator, step 1 only the critic


def test_critic_backward_in_two_parts_gives_the_joint_gradients(tmp_path, monkeypatch):
    """The critic's loss backpropagated in two parts (flow matching, then GAN D + R1, the first graph
    freed before the second's forwards) gives the joint backward's gradients and losses."""
    from helios.infra.guard import StepGuard
    from helios.infra.parallel import TrainerRoleSteps
    from helios.trainer import Trainer

    seen = _grads_seen_when(monkeypatch, "critic_gan_loss", "fake")
    cfg = compose(
        ["stage=3", "distill.gan.start_step=0", "validation.enabled=false", "trainer.progress=false"]
    )
    trainer = Trainer(complete_tiny_distill(cfg), tmp_path)
    trainer._build_data()
    trainer._build_model()
    samples = [trainer.dataset[(i, 0)] for i in range(2)]
    batch = next(iter(torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=trainer.dataset.collate)))
    grads, losses = {}, {}
    for mode in ("parts", "joint"):
        trainer.stage.d.critic_backward = mode
        trainer.model.zero_grad(set_to_none=True)
        guard = StepGuard(torch.device("cpu"))
        roles = TrainerRoleSteps(trainer.role_names, {}, None, 1, True, guard, lambda role: None)
        out, _ = trainer.stage.forward_backward(
            trainer.model,
            batch,
            torch.Generator().manual_seed(7),
            roles=roles,
            step=1,  # critic only, GAN on
        )
        assert set(out) == {"critic"}  # only the critic trained (and its backward ran)
        losses[mode] = float(out["critic"])
        grads[mode] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.close()
    assert seen == [True, False]  # parts: the flow part's backward ran before the GAN part's forward
    assert losses["parts"] == pytest.approx(losses["joint"], rel=1e-6)
    assert grads["parts"].keys() == grads["joint"].keys() and any(
        k.startswith("heads.") for k in grads["joint"]
    )
    for name, g in grads["joint"].items():
        torch.testing.assert_close(
            grads["parts"][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name
        )


def test_renoise_tau_is_shifted_for_the_token_count():
    """Dynamic Re-noise (Table 2): tau ~ Beta, then linearly shifted by the section's token count (1.92 at
    one 384x640 section, 9 x 24 x 40 tokens: mu = 0.5 + (8640 - 256) * 0.65 / 3840) and clamped."""
    from types import SimpleNamespace

    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))  # linear shift, the reference's stage-3 law
    drawn = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.999])
    stage.phase.renoise = SimpleNamespace(sample=lambda n, step, gen: drawn[:n].clone())
    target = torch.zeros(6, 16, 9, 48, 80)
    draws = stage.phase.draws(target, torch.Generator().manual_seed(0), step=0)
    s = 0.5 + (8640 - 256) * 0.65 / 3840
    assert s == pytest.approx(1.919, abs=1e-3)
    expected = (s * drawn / (1 + (s - 1) * drawn)).clamp(0.02, 0.98)
    torch.testing.assert_close(draws["tau"], expected)


class _Score(torch.nn.Module):
    """A stand-in score, v = a x + c mean(prompt), recording its inputs (the prompt matters for CFG)."""

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.a, self.c, self.inputs, self.timesteps, self.prompt_dtypes = a, c, [], [], []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **_):
        self.inputs.append(hidden_states.detach().clone())
        self.prompt_dtypes.append(encoder_hidden_states.dtype)
        self.timesteps.append(timestep.detach().clone())
        prompt = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (self.a * hidden_states + self.c * prompt,)


def test_generator_dmd_gradient_is_the_hand_computed_one():
    """Eq. 11-12 on stand-in scores: x_tau = (1 - tau) x0 + tau eps; real x0 with CFG from the conditional
    and unconditional prompts, fake x0 = x_tau - tau v_fake; the generator's sample receives
    (fake_x0 - real_x0) / mean|x0 - real_x0| (over its numel). Equal scores give no gradient."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    scale = 2.5
    stage = Stage3Distilled(compose(["stage=3", f"distill.real_cfg={scale}"]))
    b, shape = 3, (3, 4, 2, 6, 6)
    stage.phase.uncond = torch.zeros(1, 5, 8)
    cond = {"encoder_hidden_states": torch.ones(b, 5, 8)}
    tau = torch.tensor([0.2, 0.5, 0.9])
    t5 = tau.view(-1, 1, 1, 1, 1)

    def run(real, fake):
        x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        m = DistillModule(torch.nn.Identity(), fake=fake, real=real)
        metrics = {}
        loss = stage.phase.generator_loss(
            m, None, x0, cond, {"tau": tau}, False, torch.Generator().manual_seed(2), metrics
        )
        loss.backward()
        return x0, real.inputs[0], metrics

    real, fake = _Score(0.7, 0.4), _Score(-0.3, 0.1)
    x0, xt, metrics = run(real, fake)
    assert all(torch.equal(x, xt) for x in real.inputs + fake.inputs)  # every score sees one x_tau
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(2))  # the step's generator, first draw
    torch.testing.assert_close(xt, (1 - t5) * x0.detach() + t5 * eps)
    for t in real.timesteps + fake.timesteps:  # at the re-noise level, on the 0-1000 scale
        torch.testing.assert_close(t.flatten().float(), tau * 1000)
    v_cond, v_uncond = 0.7 * xt + 0.4, 0.7 * xt
    real_x0 = xt - t5 * (v_uncond + scale * (v_cond - v_uncond))
    fake_x0 = xt - t5 * (-0.3 * xt + 0.1)
    norm = (x0.detach() - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = (fake_x0 - real_x0) / norm
    torch.testing.assert_close(x0.grad, grad / x0.numel())
    assert float(metrics["dmd_grad_norm"]) == pytest.approx(float(grad.norm() / math.sqrt(b)), rel=1e-5)
    same = _Score(0.7, 0.4)
    stage.d.real_cfg = 1.0  # cond only: the real score is the fake score
    x0, _, _ = run(same, same)
    assert x0.grad.abs().max() < 1e-7


def test_the_real_scores_unconditional_prompt_takes_the_conditions_dtype():
    """The unconditional prompt (read once in float32) reaches the real score in the dtype of the step's
    condition (bfloat16 in a 14B run, whose frozen weights refuse a float32 input): float64 here."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3"]))
    stage.phase.uncond = torch.zeros(1, 5, 8)
    real = _Score(0.7, 0.4)
    m = DistillModule(torch.nn.Identity(), fake=_Score(-0.3, 0.1), real=real)
    cond = {"encoder_hidden_states": torch.ones(2, 5, 8, dtype=torch.float64)}
    x0 = torch.randn(2, 4, 2, 6, 6, dtype=torch.float64)
    tau = {"tau": torch.tensor([0.3, 0.6])}
    stage.phase.generator_loss(m, None, x0, cond, tau, False, torch.Generator().manual_seed(2), {})
    assert real.prompt_dtypes == [torch.float64, torch.float64]  # the conditional branch, then CFG's


def test_the_bidirectional_teachers_context_noise_comes_from_the_steps_generator():
    """The re-noised real context of the bidirectional teacher is drawn from the step's generator (shared by
    the ranks, restored on resume), not the global stream: the same generator gives the same segments
    whatever the global stream's state."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(
        compose(["stage=3", "distill.real_score=bidirectional", "distill.bidirectional_frames=8"])
    )
    stage.phase.uncond = torch.zeros(1, 5, 8)

    class Batch:
        latents = torch.randn(2, 16, stage.layout.clip_frames, 4, 4)

    def segments(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        x0 = torch.randn(2, 16, stage.layout.window, 4, 4, generator=torch.Generator().manual_seed(1))
        real = _Score(0.7, 0.4)
        m = DistillModule(torch.nn.Identity(), fake=_Score(-0.3, 0.1), real=real)
        cond, tau = {"encoder_hidden_states": torch.ones(2, 5, 8)}, torch.tensor([0.3, 0.6])
        stage.phase.generator_loss(
            m, Batch, x0, cond, {"tau": tau}, False, torch.Generator().manual_seed(2), {}
        )
        assert real.inputs[0].shape[2] == 8  # [context, x_tau]: one segment
        return real.inputs

    assert all(torch.equal(a, b) for a, b in zip(segments(0), segments(1), strict=True))


def test_the_critics_flow_time_is_kept_off_the_ends():
    """The fake score's flow time t (uniform, shifted for the token count) is clamped to [0.02, 0.98] as the
    reference's [20, 980]: never pure noise, never the clean sample."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))
    draws = stage.phase.draws(torch.zeros(4000, 4, 1, 4, 4), torch.Generator().manual_seed(0), step=0)
    t = draws["t"]
    assert float(t.min()) == pytest.approx(0.02) and float(t.max()) == pytest.approx(0.98)
    assert 0.9 < float(((t > 0.02) & (t < 0.98)).float().mean()) < 1.0  # the ends hold the clamped few


def test_the_discriminator_reads_the_fake_scores_features_on_its_token_grid():
    """The GAN heads read the fake score's block features as a (frames, h / 2, w / 2) token grid (the
    transformer's 1 x 2 x 2 patches) of the sample they score."""
    import contextlib
    from types import SimpleNamespace

    from helios.stages.distilled.post import PostPhase

    grids = []

    class Heads:
        @contextlib.contextmanager
        def capture(self, fake):
            yield []

        def logits(self, store, grid, output):
            grids.append(grid)
            return output.mean()

    m = SimpleNamespace(heads=Heads(), fake=_Score(1.0, 0.0))
    x, cond = torch.zeros(1, 16, 3, 8, 12), {"encoder_hidden_states": torch.zeros(1, 5, 8)}
    PostPhase._disc(m, x, torch.full((1,), 500.0), cond)
    assert grids == [(3, 4, 6)]


def test_critic_flow_loss_vanishes_for_the_exact_velocity_of_the_generators_sample():
    """Eq. 13: the fake score learns the flow of the generator's samples, x_t = (1 - t) x0 + t eps with
    target eps - x0; a score that returns the exact velocity of that path given x0 has zero loss."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3"]))
    x0d = torch.randn(2, 4, 2, 6, 6, generator=torch.Generator().manual_seed(0))

    class Exact(torch.nn.Module):
        def forward(self, hidden_states, timestep, return_dict=False, **_):
            return ((hidden_states - x0d) / (timestep / 1000).view(-1, 1, 1, 1, 1),)

    draws = {"t": torch.tensor([0.3, 0.8]), "eps": torch.randn(x0d.shape, generator=torch.Generator())}
    metrics = {}
    m = DistillModule(torch.nn.Identity(), fake=Exact())
    loss = stage.phase.critic_flow_loss(m, x0d, None, {}, draws, None, metrics)
    assert float(loss) < 1e-10 and metrics["loss_flow"] == loss


def test_critic_optimizer_group_takes_the_fake_score_learning_rate():
    """TTUR's second learning rate (Table 2: generator 2e-6, fake score 4e-7), and the tiny config keeps
    the two apart so that a run can tell them apart."""
    from helios.stages.distilled.roles import DistillModule, DistillRoles

    real = ["stage3=post", "distill.teacher=/t", "model.transformer.path=/m", "data.path=/d"]
    for overrides in (["stage=3", *real], ["stage=3"]):
        cfg = compose(overrides)
        assert cfg.distill.fake_lr != cfg.optim.lr
        m = DistillModule(torch.nn.Linear(2, 2), fake=torch.nn.Linear(2, 2))
        lrs = {r.name: r.lr for r in DistillRoles(cfg, None).training_roles(m)}
        assert lrs == {"generator": cfg.optim.lr, "critic": cfg.distill.fake_lr}


def test_a_placement_block_refuses_a_name_that_is_no_role():
    """A misspelt role would never be brought onto the device (or prefetched): refused, offload or not."""
    from helios.stages import Stage3Distilled

    roles = Stage3Distilled(compose(["stage=3"])).roles
    refusal = r"resident\(XXcriticXX\): not a stage-3 role \(one of generator, critic, real\)"
    with pytest.raises(KeyError, match=refusal):
        with roles.resident("generator", then="XXcriticXX"):
            pass
    with roles.resident("generator", "real", then="critic"):  # every role of stage 3 is known
        pass


def test_a_rollout_padded_to_the_agreed_forward_count_discards_the_extra_forwards():
    """ZeRO-3 gathers a stage's weights in every forward, so the ranks agree on each stage's forward count
    (``forwards``): a rank whose exit comes earlier makes up the difference with forwards of the generator
    whose output it discards; its sample is the unpadded one."""
    from collections import Counter

    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))
    shape = (1, 16, stage.layout.window, 16, 16)
    cond = {"encoder_hidden_states": torch.zeros(1, 4, 32)}
    widths: list[int] = []  # the stage of each forward, by its width: 4, 8, 16

    class Counting(torch.nn.Module):
        def forward(self, hidden_states, timestep, return_dict=False, **_):
            widths.append(hidden_states.shape[-1])
            return (0.5 * hidden_states + timestep.view(-1, 1, 1, 1, 1) / 1000,)

    exits = [0, 1, 0]
    plain = stage.rollout(Counting(), cond, shape, torch.Generator().manual_seed(0), grad=False, exits=exits)
    assert Counter(widths) == {4: 1, 8: 2, 16: 1}
    widths.clear()
    padded = stage.rollout(
        Counting(), cond, shape, torch.Generator().manual_seed(0), grad=False, exits=exits, forwards=[2, 2, 3]
    )
    assert Counter(widths) == {4: 2, 8: 2, 16: 3}
    assert torch.equal(padded, plain)


def test_the_exit_steps_are_uniform_over_every_step_of_each_stage():
    """Each pyramid stage's exit is a uniform draw over all of its DMD steps, the last one included (on a
    video's first section, over the doubled schedule)."""
    from helios.stages import Stage3Distilled

    rollout = Stage3Distilled(compose(["stage=3"])).rollout
    for first in (False, True):
        counts = [
            len(rollout.stage_schedule(k, (1, 1, 1, 2, 2), first)[0]) for k in range(len(rollout.steps))
        ]
        drawn = [rollout.exit_steps(torch.Generator().manual_seed(s), first) for s in range(400)]
        for k, n in enumerate(counts):
            assert {d[k] for d in drawn} == set(range(n)), (first, k, n)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_each_rank_trains_its_first_sections_on_the_doubled_schedule(tmp_path, backend):
    """As the reference (and as sampling uses it): a rank whose micro-batch has an empty history trains the
    first section's doubled schedule, whatever the other ranks draw; under ZeRO-3 the other rank makes up the
    forward count with discarded forwards (no hang). first_section is the fraction of ranks that did."""
    from helios.stages import Stage3Distilled

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tests/helpers/first_section_probe.py", str(tmp_path), f"parallel={backend}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rollout = Stage3Distilled(compose(["stage=3"])).rollout
    schedules = {
        first: {
            float(t)
            for k, hw in enumerate((2, 4, 8))
            for t in rollout.stage_schedule(k, (1, 16, 3, hw, hw), first)[0]
        }
        for first in (True, False)
    }
    doubled_only = schedules[True] - schedules[False]
    assert doubled_only and set(ranks[0]["timesteps"]) & doubled_only  # rank 0 trained the doubled schedule
    assert set(ranks[1]["timesteps"]) <= schedules[False]
    assert ranks[0]["first_section"] == ranks[1]["first_section"] == [0.5, 0.5]


def test_only_the_generators_history_is_saturated():
    """The reference's stage 3: the generator's history (not its anchor) is saturated; the scores are given
    the history without it; under mode=paper or with saturation off nothing changes."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3"]))
    layout = stage.layout
    history, anchor = torch.randn(2, 16, layout.num_history, 4, 4), torch.randn(2, 16, 1, 4, 4)
    cond = {"encoder_hidden_states": torch.zeros(2, 8, 32), **layout.model_inputs(history, anchor)}
    saturated = [stage.phase.saturated(cond, torch.Generator().manual_seed(s)) for s in range(10)]
    assert all(torch.equal(c["latents_history_short"][:, :, :1], anchor) for c in saturated)
    assert any(not torch.equal(c["latents_history_long"], cond["latents_history_long"]) for c in saturated)
    for c in saturated:  # the per-position channel mean is what saturation keeps
        torch.testing.assert_close(
            c["latents_history_mid"].mean(dim=1), cond["latents_history_mid"].mean(dim=1)
        )
    assert torch.equal(
        cond["latents_history_long"], layout.model_inputs(history, anchor)["latents_history_long"]
    )
    # a frame holds content when any of its channels does (here only the first): every region is saturated
    # by some draw, the newest as the oldest
    sparse = torch.zeros_like(history)
    sparse[:, 0] = torch.randn(2, layout.num_history, 4, 4)
    cond1 = {**cond, **layout.model_inputs(sparse, anchor)}
    parts = [stage.phase.saturated(cond1, torch.Generator().manual_seed(s)) for s in range(10)]
    for key in ("latents_history_long", "latents_history_mid"):
        assert any(not torch.equal(c[key], cond1[key]) for c in parts), key
    stage.cfg.history.corrupt.mode = "paper"
    assert stage.phase.saturated(cond, torch.Generator()) is cond


@pytest.mark.parametrize("empty", [1.0, 0.5, 0.0])
def test_the_first_section_schedule_follows_this_ranks_own_history(empty):
    """The rollout gets first_section exactly when every sample of this rank's micro-batch has an empty
    history (fast, one process; the two-rank test shows ranks deciding apart)."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3", "distill.gan.enabled=false"]))
    stage.phase.uncond = torch.zeros(1, 8, 32)
    layout, seen = stage.layout, []

    class Rollout:
        exit_steps = staticmethod(stage.rollout.exit_steps)

        def __call__(self, generator, cond, shape, gen, grad, exits, first, forwards):
            seen.append(first)
            return torch.zeros(shape)

    stage.phase.rollout = Rollout()
    shape = (2, 16, layout.window, 4, 4)
    history, anchor = torch.zeros(2, 16, layout.num_history, 4, 4), torch.zeros(2, 16, 1, 4, 4)
    cond = {"encoder_hidden_states": torch.zeros(2, 8, 32), **layout.model_inputs(history, anchor)}
    stage.phase.condition = lambda batch, gen: (cond, torch.zeros(shape), {"history_empty": empty})
    m = DistillModule(torch.nn.Linear(1, 1), fake=_Score(0.1, 0.0))

    class NoBackward(RoleSteps):  # the stand-in scores have no weights to train
        def backward(self, role, loss):
            pass

    stage.phase.step(m, None, torch.Generator(), torch.Generator(), NoBackward(), step=1)
    assert seen == [empty == 1.0]


@pytest.mark.parametrize("critic_backward", ["joint", "parts"])
def test_each_loss_runs_as_its_roles_forward_and_a_zero3_generator_gets_the_agreed_forward_counts(
    monkeypatch, critic_backward
):
    """The rollout is the generator's forward and both critic losses the critic's (one backward, or one
    per part): under DDP each role's wrapper all-reduces what ran through it. A ZeRO-3 generator is given
    the forward counts agreed over the ranks (here another rank's exits are two steps later)."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled import post
    from helios.stages.distilled.roles import DistillModule

    parts = f"distill.critic_backward={critic_backward}"
    stage = Stage3Distilled(compose(["stage=3", "distill.gan.start_step=0", "parallel=zero3", parts]))
    stage.phase.uncond = torch.zeros(1, 8, 32)
    layout, seen = stage.layout, {}
    monkeypatch.setattr(post, "agree_max", lambda values: [v + 2 for v in values])

    class Rollout:
        exit_steps = staticmethod(stage.rollout.exit_steps)

        def __call__(self, generator, cond, shape, gen, grad, exits, first, forwards):
            seen.update(exits=exits, forwards=forwards, dtype=cond["encoder_hidden_states"].dtype)
            return torch.zeros(shape)

    class Recorded(RoleSteps):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, str]] = []
            self.finals: list[bool] = []

        def forward(self, role, fn, *args, final=True):
            self.calls.append((role, getattr(fn, "__name__", type(fn).__name__)))
            self.finals.append(final)
            return fn(*args)

        def backward(self, role, loss):
            self.calls.append((role, "backward"))

    def critic_flow_loss(*args):
        return torch.zeros((), requires_grad=True)

    def critic_gan_loss(*args):
        return torch.ones((), requires_grad=True)

    stage.phase.rollout = Rollout()
    monkeypatch.setattr(stage.phase, "critic_flow_loss", critic_flow_loss)
    monkeypatch.setattr(stage.phase, "critic_gan_loss", critic_gan_loss)
    shape = (2, 16, layout.window, 4, 4)
    history, anchor = torch.zeros(2, 16, layout.num_history, 4, 4), torch.zeros(2, 16, 1, 4, 4)
    cond = {"encoder_hidden_states": torch.zeros(2, 8, 32), **layout.model_inputs(history, anchor)}
    stage.phase.condition = lambda batch, gen: (cond, torch.zeros(shape), {"history_empty": 0.0})
    generator = torch.nn.Linear(1, 1).to(torch.bfloat16)  # the inputs are cast to the generator's dtype
    m = DistillModule(generator, fake=_Score(0.1, 0.0), heads=torch.nn.Identity())
    roles = Recorded()
    started = time.perf_counter()
    losses, stats = stage.phase.step(m, None, torch.Generator(), torch.Generator(), roles, step=1)
    elapsed = time.perf_counter() - started
    flow, gan, backward = (
        ("critic", "critic_flow_loss"),
        ("critic", "critic_gan_loss"),
        ("critic", "backward"),
    )
    critic = [flow, gan, backward] if critic_backward == "joint" else [flow, backward, gan, backward]
    assert roles.calls == [("generator", "Rollout"), *critic]
    # the flow part of a split critic is not its final forward (DDP all-reduces once, after the GAN part)
    assert roles.finals == ([True, True, True] if critic_backward == "joint" else [True, False, True])
    assert float(losses["critic"]) == 1.0
    assert set(stats) == {"history_empty", *post.EXTRA_METRICS}  # the dashboard's keys, no others
    assert 0 <= stats["time_rollout_s"] <= elapsed and 0 <= stats["time_critic_s"] <= elapsed
    assert seen["forwards"] == [e + 3 for e in seen["exits"]] and seen["dtype"] == torch.bfloat16


@pytest.mark.parametrize("shared_teacher", [True, False])
def test_stage3_roles_train_only_their_adapters_and_heads(shared_teacher):
    """What each role trains, as the reference: the generator its LoRA (memory patches included, no patch
    embedding), the critic its LoRA (neither) and the GAN heads; every base tensor and the separate real
    score stay frozen."""
    from helios.model import build_transformer
    from helios.stages.distilled.roles import DistillRoles

    cfg = compose(["stage=3", f"distill.shared_teacher={shared_teacher}"])
    base = build_transformer(cfg.model.transformer).state_dict()
    m = DistillRoles(cfg, lambda source, dtype: {k: v.clone() for k, v in base.items()}).build(
        None, torch.float32
    )
    for role in (m.generator, m.fake):
        trainable = [n for n, p in role.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), [n for n in trainable if "lora_" not in n]
        assert not any(n.startswith("patch_embedding.") for n in trainable)
    assert any(n.startswith("patch_long.") for n, p in m.generator.named_parameters() if p.requires_grad)
    assert not any(n.startswith("patch_long.") for n, p in m.fake.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for p in m.heads.parameters())
    if not shared_teacher:
        assert not any(p.requires_grad for p in m.real.parameters())


@pytest.mark.parametrize("generator_init", [None, "/mid"])
def test_each_role_reads_its_own_copy_of_its_source_in_the_runs_dtype(generator_init):
    """The generator's base is read from ``distill.generator_init`` (the Mid), else from the teacher; the fake
    score's and the separate real score's from the teacher, each a read of its own; every frozen base in
    the run's dtype (bf16), but diffusers' fp32 modules; the adapters train in fp32; every role with the
    run's kernels (``model.kernels.norm=triton``: Flash Norm)."""
    from helios.model import build_transformer
    from helios.model.weights import keeps_fp32

    base = build_transformer(compose(["stage=3"]).model.transformer).state_dict()
    reads = []

    def load(source, dtype):
        reads.append((source, dtype))
        return {k: v.clone() for k, v in base.items()}  # fp32, as a source may store it

    init = [f"distill.generator_init={generator_init}"] if generator_init else []
    overrides = ["distill.shared_teacher=false", "model.kernels.norm=triton", *init]
    model = _roles(overrides, load).build(None, torch.bfloat16)
    assert reads == [(generator_init or "/teacher", torch.bfloat16), *[("/teacher", torch.bfloat16)] * 2]
    for role in (model.generator, model.fake, model.real):
        assert "FlashLayerNorm" in {type(module).__name__ for module in role.modules()}
        for name, p in role.named_parameters():
            fp32 = p.requires_grad or keeps_fp32(name)
            assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name


def _holds_base_value(generator: torch.nn.Module, value: float) -> bool:
    """The (LoRA-wrapped) generator's base patch embedding is the given base's tensor, all ``value``."""
    embed = [p for n, p in generator.named_parameters() if n.endswith("patch_embedding.weight")]
    return len(embed) == 1 and torch.equal(embed[0], torch.full_like(embed[0], value))


def test_a_generator_given_its_base_holds_it_and_only_the_critic_reads_the_teacher():
    """``init_from`` (a merged previous phase) hands the generator its base: the generator holds those
    tensors, and only the fake score reads the teacher."""
    from helios.model import build_transformer

    base = build_transformer(compose(["stage=3"]).model.transformer).state_dict()
    reads = []

    def load(source, dtype):
        reads.append(source)
        return {k: v.clone() for k, v in base.items()}

    given = {k: torch.full_like(v, 0.25) for k, v in base.items()}
    model = _roles([], load).build(given, torch.float32)
    assert reads == ["/teacher"]
    assert _holds_base_value(model.generator, 0.25)


def test_export_and_generate_build_the_generator_on_the_base_they_are_given():
    """``build_inference_model(base_state)`` (export, generate of an ``init_from`` run): the generator holds
    the given base and no teacher is read."""
    from helios.model import build_transformer
    from helios.stages import Stage3Distilled

    def load(source, dtype):
        raise AssertionError(f"read {source}")

    stage = Stage3Distilled(compose(["stage=3", "distill.teacher=/teacher"]), load)
    base = build_transformer(compose(["stage=3"]).model.transformer).state_dict()
    model = stage.build_inference_model({k: torch.full_like(v, 0.5) for k, v in base.items()})
    assert _holds_base_value(model.generator, 0.5)


def test_roles_start_from_their_sources_weights_and_the_gan_has_its_output_head(tmp_path):
    """The generator's base is distill.generator_init's model (the Mid), the fake score's the teacher's
    (the Base), by value; the GAN heads include the reference's head on the DiT output."""
    from helios.loading import merged_weights
    from helios.trainer import Trainer

    cfg = complete_tiny_distill(compose(["stage=3", "validation.enabled=false", "trainer.progress=false"]))
    trainer = Trainer(cfg, tmp_path)
    trainer._build_model()
    m = trainer.model

    def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The base tensors of a (LoRA-wrapped) transformer under their plain names."""
        return {
            k.replace(".base_layer", ""): v.float()
            for k, v in module.state_dict().items()
            if "lora_" not in k and "memory_patch" not in k
        }

    # each source's model as it ended (its LoRA merged); the roles' new adapters start at zero (B = 0)
    mid, base = (merged_weights(s) for s in (cfg.distill.generator_init, cfg.distill.teacher))
    for role, want in ((m.generator, mid), (m.fake, base)):
        got = base_weights(role)
        assert want.keys() <= got.keys()
        assert all(torch.equal(got[k], v.float()) for k, v in want.items())
    assert any(not torch.equal(mid[k], base[k]) for k in mid)  # two sources, told apart
    assert m.heads is not None and m.heads.output_head is not None
    trainer.close()


def test_the_post_phase_takes_its_renoise_annealing_and_gan_crop_from_the_config():
    """Dynamic Re-noise anneals over ``distill.renoise_anneal_steps``; the GAN crop is ``distill.gan.crop``
    of each side, rounded down to even sizes (the reference's patch grid)."""
    from helios.stages import Stage3Distilled

    cfg = ["stage=3", "distill.renoise_anneal_steps=40", "distill.gan.crop=0.5"]
    phase = Stage3Distilled(compose(cfg)).phase
    assert phase.renoise.params(40) == (1.0, 1.0) and phase.renoise.params(20) != (1.0, 1.0)
    assert phase._crop_hw(torch.zeros(1, 1, 1, 14, 22)) == (6, 10)
    assert phase._crop_hw(torch.zeros(1, 1, 1, 4, 6)) == (2, 2)  # at least 2 x 2, even on both sides


def test_a_first_section_is_a_history_with_no_content_at_all():
    from helios.stages.distilled.rollout import first_section

    assert first_section(torch.zeros(2, 4, 3, 2, 2))
    assert not first_section(torch.full((2, 4, 3, 2, 2), 0.5)) and not first_section(torch.full((1, 1), -2.0))


def test_the_critic_engine_names_its_parameters_as_the_roles_module_does():
    """Under ZeRO the critic is one engine over the fake score and the GAN heads: its parameter names are
    the roles module's (``fake.*``, ``heads.*``), the names checkpoints and the optimiser groups use."""
    from helios.model.gan import GanHeads
    from helios.stages.distilled.roles import DistillModule, DistillRoles

    fake, heads = torch.nn.Linear(2, 2), GanHeads([0], 2, 8, 4)
    m = DistillModule(torch.nn.Linear(2, 2), fake=fake, heads=heads)
    critic = DistillRoles.role_modules(m)["critic"]
    expected = {n for n, _ in m.named_parameters() if n.startswith(("fake.", "heads."))}
    assert {n for n, _ in critic.named_parameters()} == expected and expected


def _ode_pair_batch(stage, pairs: str):
    """A host batch of 2 ODE pairs for the tiny 3-stage pyramid: ``endpoint`` (each stage's start and end) or
    ``trajectory`` (a teacher state at timestep 500 and the stage's end)."""
    from helios.data.ode_pair_shards import TensorDict

    b, c, w, gen = 2, 16, stage.layout.window, torch.Generator().manual_seed(0)
    batch = TensorDict(
        history=torch.randn(b, c, stage.layout.num_history, 16, 16, generator=gen),
        anchor=torch.randn(b, c, 1, 16, 16, generator=gen),
        prompt_embeds=torch.randn(b, 4, 32, generator=gen),
    )
    for k in range(3):
        hw = 16 // 2 ** (2 - k)
        if pairs == "endpoint":
            batch[f"stage{k}_start"] = torch.randn(b, c, w, hw, hw, generator=gen)
        else:
            batch[f"stage{k}_x"] = torch.randn(b, c, w, hw, hw, generator=gen)
            batch[f"stage{k}_t"] = torch.full((b,), 500.0)
        batch[f"stage{k}_end"] = torch.randn(b, c, w, hw, hw, generator=gen)
    return batch


def test_the_ode_init_step_on_endpoint_pairs_regresses_onto_the_stage_end():
    """``helios.ode_pairs source=clips``: x_t = sigma start + (1 - sigma) end at one DMD step of the drawn
    stage, x0 = x_t - sigma v regressed onto the stage's end, so the exact velocity start - end costs 0."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3", "stage3=tiny_ode"]))
    batch = _ode_pair_batch(stage, "endpoint")

    class Exact(torch.nn.Module):  # the straight path's velocity, start - end, at every stage
        def __init__(self) -> None:
            super().__init__()
            self.zero = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, return_dict=False, **_):
            k = {4: 0, 8: 1, 16: 2}[hidden_states.shape[-1]]
            return (batch[f"stage{k}_start"] - batch[f"stage{k}_end"] + self.zero,)

    stages = set()
    for seed in range(6):
        losses, stats = stage.phase.step(
            DistillModule(Exact()), batch, torch.Generator().manual_seed(seed), None, RoleSteps(), 0
        )
        assert float(losses["generator"]) < 1e-10
        stages.add(stats["ode_stage"])
    assert len(stages) > 1


def test_the_ode_init_step_on_trajectory_pairs_places_each_state_in_its_stage_window():
    """``helios.ode_pairs source=rollout``: the teacher's state at timestep t of stage k's window
    (t_max, t_min) lies at sigma = (t - t_min) / (t_max - t_min) of the stage's path; x0 = x_t - sigma v is
    regressed onto the stage's end, so the exact velocity (x_t - end) / sigma costs 0."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3", "stage3=tiny_ode"]))
    batch = _ode_pair_batch(stage, "trajectory")
    for k, (t_max, t_min) in enumerate(stage.phase.windows):
        batch[f"stage{k}_t"] = torch.full((2,), t_min + 0.25 * (t_max - t_min))  # a quarter of the way up

    class Exact(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zero = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, return_dict=False, **_):
            k = {4: 0, 8: 1, 16: 2}[hidden_states.shape[-1]]
            return ((batch[f"stage{k}_x"] - batch[f"stage{k}_end"]) / 0.25 + self.zero,)

    class Recorded(RoleSteps):  # the forward and the backward run as the generator's (its DDP wrapper)
        def __init__(self) -> None:
            self.roles: list[str] = []

        def forward(self, role, fn, *args, final=True):
            self.roles.append(role)
            return fn(*args)

        def backward(self, role, loss):
            self.roles.append(role)

    stages, roles = set(), Recorded()
    for seed in range(6):
        losses, stats = stage.phase.step(
            DistillModule(Exact()), batch, torch.Generator().manual_seed(seed), None, roles, 0
        )
        assert float(losses["generator"]) < 1e-10, stats["ode_stage"]
        stages.add(stats["ode_stage"])
    assert len(stages) > 1 and roles.roles == ["generator"] * 12


@pytest.mark.parametrize("pairs", ["endpoint", "trajectory"])
def test_the_ode_init_step_computes_on_the_stages_device(pairs):
    """The batch arrives on the host; the step's state, timestep, sigma and conditioning go to the stage's
    device (meta: a tensor left on the host fails there, as on a GPU)."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3", "stage3=tiny_ode"]))
    stage.device = torch.device("meta")
    batch = _ode_pair_batch(stage, pairs)
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zero = torch.nn.Parameter(torch.zeros((), device="meta"))

        def forward(self, hidden_states, timestep, return_dict=False, **inputs):
            floats = [hidden_states, timestep, *(v for v in inputs.values() if v.is_floating_point())]
            seen.extend(t.device.type for t in floats)  # (the frame indices: diffusers moves them itself)
            return (hidden_states + self.zero,)

    losses, _ = stage.phase.step(
        DistillModule(Recording()), batch, torch.Generator().manual_seed(0), None, RoleSteps(), 0
    )
    assert set(seen) == {"meta"} and losses["generator"].device.type == "meta"


def test_the_ode_init_phase_drops_captions_at_the_runs_rate(monkeypatch):
    """``data.caption_dropout`` reaches the ODE-pair dataset of the ODE-init phase (its unconditional
    branch trains as in the other stages)."""
    from helios.stages.distilled import ode_init

    seen = []
    monkeypatch.setattr(ode_init, "ode_pair_dataset", lambda *args: seen.append(args[-1]))
    cfg = compose(["stage=3", "stage3=tiny_ode", "data.caption_dropout=0.25", "distill.ode_pairs=/pairs"])
    ode_init.OdeInitPhase(cfg, None, None, None, lambda: torch.device("cpu")).dataset(None)
    assert seen == [0.25]


def _roles(overrides: list[str], load):
    from helios.stages.distilled.roles import DistillRoles

    return DistillRoles(compose(["stage=3", "distill.teacher=/teacher", *overrides]), load)


def test_without_the_gan_the_post_phase_builds_no_heads():
    """``distill.gan.enabled=false`` (Table 5's "w/o GAN"): no GAN heads are built or trained."""
    roles = _roles(["distill.phase=post", "distill.gan.enabled=false"], lambda source, dtype: None)
    model = roles.build(None, torch.float32)
    assert model.fake is not None and model.heads is None
    assert _roles(["distill.phase=post"], lambda source, dtype: None).build(None, torch.float32).heads


def test_a_random_base_generator_reads_no_teacher_weights():
    """Export and generate of a ``model.transformer.source=random`` run restore the base from the checkpoint:
    building the generator reads no teacher."""

    def load(source, dtype):
        raise AssertionError(f"read {source}")

    assert _roles(["model.transformer.source=random"], load).build_generator(None, torch.float32).generator
    published = ["model.transformer.source=helios", "model.transformer.path=/helios-base"]
    with pytest.raises(AssertionError, match="read /teacher"):  # a published base: the teacher is its start
        _roles(published, load).build_generator(None, torch.float32)


def test_a_generator_step_logs_the_time_of_each_part(tmp_path):
    """The post phase's step reports only declared metrics, and on a step that updates the generator (the
    first, TTUR) the seconds of the rollout, the generator's and the critic's parts are on the dashboard."""
    from helios.core.history import Task
    from helios.trainer import Trainer

    cfg = complete_tiny_distill(compose(["stage=3", "validation.enabled=false", "trainer.progress=false"]))
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.prepare()
        metrics = trainer.train_step()
    finally:
        trainer.close()
    declared = trainer.stage.metric_names()
    assert {"time_rollout_s", "time_generator_s", "time_critic_s"} <= set(declared) <= set(metrics)
    assert metrics["update_g"] == 1.0
    # a declared name the step never reports is logged as NaN: the history's statistics are reported
    tasks = [k for k in declared if k.startswith("task_")]
    assert sorted(tasks) == sorted(f"task_{t.name.lower()}" for t in Task)
    assert all(math.isfinite(float(metrics[k])) for k in ["loss", "corrupt_frac", *tasks])
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in declared if k.startswith("time_"))


def test_the_critic_gan_loss_re_noises_real_and_generated_samples_to_tau_and_crops_them_alike(monkeypatch):
    """Eq. 14-16: the discriminator sees x_tau = (1 - tau) x + tau eps of the real sample and of the
    generated one (the real one's noise drawn first), both cropped at the step's offsets, at timestep
    1000 tau; its loss is softplus(-D(real)) + softplus(D(fake)) plus the R1 term of its third forward."""
    from helios.core.distillation import critic_gan_term
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.post import PostPhase

    phase = Stage3Distilled(compose(["stage=3", "distill.gan.crop=0.5"])).phase
    seen = []

    def disc(m, x, t, cond):
        seen.append((x.detach().clone(), t.clone()))
        return x.mean(dim=(1, 2, 3, 4))

    monkeypatch.setattr(PostPhase, "_disc", staticmethod(disc))
    data = torch.Generator().manual_seed(0)
    target, x0d = torch.randn(2, 4, 3, 8, 12, generator=data), torch.randn(2, 4, 3, 8, 12, generator=data)
    tau = torch.tensor([0.25, 0.75])
    draws = {"tau": tau, "top": 2, "left": 4}
    metrics = {}
    loss = phase.critic_gan_loss(None, x0d, target, {}, draws, torch.Generator().manual_seed(5), metrics)
    gen, t5 = torch.Generator().manual_seed(5), tau.view(-1, 1, 1, 1, 1)
    real_eps, fake_eps = torch.randn(target.shape, generator=gen), torch.randn(x0d.shape, generator=gen)
    crop = lambda x: x[..., 2:6, 4:10]  # noqa: E731  (crop 0.5 of 8 x 12: 4 x 6 at (2, 4))
    real, fake = crop((1 - t5) * target + t5 * real_eps), crop((1 - t5) * x0d + t5 * fake_eps)
    (real_in, t_real), (fake_in, t_fake), (perturbed, _) = seen
    torch.testing.assert_close(real_in, real)
    torch.testing.assert_close(fake_in, fake)
    torch.testing.assert_close(t_real, tau * 1000)
    torch.testing.assert_close(t_fake, tau * 1000)
    l_real, l_fake, l_pert = (x.mean(dim=(1, 2, 3, 4)) for x in (real, fake, perturbed))
    loss_d = torch.nn.functional.softplus(-l_real).mean() + torch.nn.functional.softplus(l_fake).mean()
    r1 = (l_real - l_pert).pow(2).mean()
    g = phase.d.gan
    torch.testing.assert_close(loss, critic_gan_term(loss_d, r1, g.w_d, g.r1_lambda, g.r1_weighting))
    assert float(metrics["loss_gan_d"]) == pytest.approx(float(loss_d), rel=1e-6)


def test_the_gan_crops_offsets_are_even_inside_the_frame_and_reach_every_even_place():
    """The crop's top-left corner is drawn on the patch grid (even offsets) so that the whole crop lies in
    the frame: every even offset from 0 to (side - crop side) is drawn, and no other."""
    from helios.stages import Stage3Distilled

    phase = Stage3Distilled(compose(["stage=3", "distill.gan.crop=0.5"])).phase
    target, gen = torch.zeros(1, 4, 3, 14, 22), torch.Generator().manual_seed(0)
    offsets = [phase.draws(target, gen, step=0) for _ in range(200)]
    assert {d["top"] for d in offsets} == {0, 2, 4, 6, 8}  # 14 - 6
    assert {d["left"] for d in offsets} == {0, 2, 4, 6, 8, 10, 12}  # 22 - 10
    assert all(phase._crop(target, d["top"], d["left"]).shape[-2:] == (6, 10) for d in offsets)


@pytest.mark.parametrize("first", [True, False])
def test_the_ode_init_step_draws_a_first_sections_time_from_its_doubled_schedule(first):
    """Endpoint pairs: a video's first section (an empty history) regresses at one of the doubled
    first-section schedule's steps when the distilled sampler amplifies the first section, a later
    section at one of the plain schedule's (the sampler's own rule, as the student will be sampled)."""
    from helios.infra.parallel import RoleSteps
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(compose(["stage=3", "stage3=tiny_ode"]))
    assert stage.cfg.validation.sampler.amplify_first
    batch = _ode_pair_batch(stage, "endpoint")
    if first:
        batch["history"] = torch.zeros_like(batch["history"])
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zero = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, return_dict=False, **_):
            seen.append(float(timestep[0]))
            return (hidden_states + self.zero,)

    drawn = {}
    for seed in range(16):
        _, stats = stage.phase.step(
            DistillModule(Recording()), batch, torch.Generator().manual_seed(seed), None, RoleSteps(), 0
        )
        drawn.setdefault(int(stats["ode_stage"]), set()).add(seen[-1])
    for k, timesteps in drawn.items():
        shape = batch[f"stage{k}_start"].shape
        doubled, plain = (
            set(stage.phase.rollout.stage_schedule(k, shape, f)[0].tolist()) for f in (True, False)
        )
        assert plain < doubled  # the doubled schedule adds steps between the plain one's
        assert (timesteps <= doubled and timesteps - plain) if first else timesteps <= plain


@pytest.mark.parametrize(
    ("gan_on", "cached", "roles"),
    [(True, False, ("generator", "critic")), (True, True, ("generator",)), (False, False, ("generator",))],
)
def test_the_generators_backward_keeps_the_critic_resident_only_for_an_uncached_gan_graph(
    gan_on, cached, roles
):
    """With ``distill.offload`` the generator's backward block holds the critic's base only where the GAN
    term's graph runs through the discriminator; a cached GAN gradient (or no GAN yet) needs the generator's
    alone (one 14B base resident, §4.2)."""
    from helios.stages import Stage3Distilled

    stage = Stage3Distilled(compose(["stage=3", f"distill.cache_gan_grad={cached}"]))
    assert stage.phase.generator_graph(gan_on) == roles


def test_a_released_offload_pool_is_gone_and_a_second_release_is_harmless():
    """The run's end frees the pool (its host buffers); releasing again (a close on an error path after the
    normal one) does nothing, and a placement block afterwards has no pool to ask (nothing is offloaded)."""
    from helios.stages import Stage3Distilled
    from helios.stages.distilled.roles import DistillModule

    stage = Stage3Distilled(
        compose(["stage=3", "distill.offload=true", "parallel.node_shared_weights=false"])
    )
    frozen = [torch.nn.Linear(2, 2).requires_grad_(False) for _ in range(2)]
    model = DistillModule(frozen[0], fake=frozen[1])
    assert stage.place(model, torch.device("cpu")) and stage.roles.pool is not None
    stage.release()
    stage.release()
    assert stage.roles.pool is None
    with stage.roles.resident("generator", "critic"):
        pass
