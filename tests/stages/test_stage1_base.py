"""Stage 1's conditioning: how a micro-batch becomes history inputs, the clean window and statistics."""

import pytest
import torch

from helios.config import compose
from helios.data.dataset import ClipBatch
from helios.stages import Stage1Base, conditioning


def _batch(b: int = 2, hw: int = 4) -> ClipBatch:
    latents = torch.randn(b, 16, 10, hw, hw) + 3  # 7 history + 3 window latent frames, no exact zeros
    return ClipBatch(
        latents, torch.randn(b, 16, 1, hw, hw), torch.randn(b, 32, 32), torch.zeros(b), torch.full((b,), 7)
    )


@pytest.mark.parametrize("latent_format", ["sections", "clip"])
def test_condition_builds_the_history_in_the_runs_latent_format(monkeypatch, latent_format):
    """The section format keeps the video's first latent as every non-T2V sample's anchor (the reference's
    data), the clip format the first kept frame: the stage hands the format to Representation Control."""
    seen = []
    real = conditioning.apply_tasks

    def spy(*args, **kwargs):
        seen.append(kwargs["section_format"])
        return real(*args, **kwargs)

    monkeypatch.setattr(conditioning, "apply_tasks", spy)
    stage = Stage1Base(compose([f"data.latent_format={latent_format}"]))
    cond, target, stats = stage.condition(_batch(), torch.Generator().manual_seed(0))
    assert seen == [latent_format == "sections"]
    assert target.shape == (2, 16, 3, 4, 4) and cond["latents_history_short"].shape[2] == 2
    assert 0.0 <= stats["history_empty"] <= 1.0


def test_the_timestep_is_the_noise_level_of_the_window_in_thousandths():
    """The DiT's timestep is 1000 σ of the very σ that mixed x_t = (1 − σ) x0 + σ ε (diffusers' convention,
    the reference's ``timesteps = sigmas * 1000``)."""
    stage = Stage1Base(compose([]))
    target = torch.randn(3, 16, 3, 4, 4)
    (group,), stats = stage.noisy_groups(target, torch.Generator().manual_seed(0), torch.Generator())
    v = group.target.flatten(1)
    sigma = ((group.x_t - target).flatten(1) * v).sum(1) / (v * v).sum(1)
    torch.testing.assert_close(group.timestep, 1000 * sigma, rtol=1e-5, atol=1e-3)
    assert stats["sigma_mean"] == pytest.approx(float(sigma.mean()), abs=1e-5)
    assert 0.0 < float(sigma.min()) and float(sigma.max()) < 1.0


def test_a_steps_statistics_are_the_declared_metrics():
    """Every statistic a stage-1 step reports is one of the stage's declared metric keys (the dashboard
    and the ranks' all-reduce use the declared list; an undeclared key would be dropped)."""
    stage = Stage1Base(compose([]))
    model = lambda hidden_states, **_: (torch.zeros_like(hidden_states, requires_grad=True),)  # noqa: E731
    losses, stats = stage.forward_backward(model, _batch(), torch.Generator().manual_seed(0), step=0)
    assert set(losses) == {"model"} and set(stats) <= set(stage.metric_names())
    assert {"corrupt_frac", "history_empty", "noisy_tokens", "sigma_mean"} <= set(stats)
    assert stats["noisy_tokens"] == 2 * 3 * (4 // 2) * (4 // 2)  # 2 samples x 3 latent frames x 2 x 2 patches


def test_the_task_fractions_are_the_shares_of_each_drawn_history_format(monkeypatch):
    """``task_<format>`` is the share of the micro-batch's samples drawn with that history format."""
    from helios.core.history import Task

    drawn = torch.tensor([Task.T2V, Task.V2V, Task.V2V, Task.I2V])
    monkeypatch.setattr(conditioning, "draw_tasks", lambda b, tasks, generator: drawn)
    _, _, stats = Stage1Base(compose([])).condition(_batch(4), torch.Generator().manual_seed(0))
    shares = {k: v for k, v in stats.items() if k.startswith("task_")}
    assert shares == {"task_t2v": 0.25, "task_i2v": 0.25, "task_v2v_partial": 0.0, "task_v2v": 0.5}


@pytest.mark.parametrize("stage", ["1", "2"])
def test_a_step_hands_the_model_every_input_on_the_stages_device(stage):
    """The batch is conditioned on the host and each forward's inputs are copied to the stage's device: a
    meta device makes the copy visible on a CPU (a tensor left on the host would stay on ``cpu``)."""
    from helios.stages import STAGES

    s = STAGES[int(stage)](compose([f"stage={stage}"]))
    s.device = torch.device("meta")
    seen: set[torch.device] = set()

    def model(**inputs):
        seen.update(v.device for v in inputs.values() if torch.is_tensor(v))
        return (torch.zeros_like(inputs["hidden_states"], requires_grad=True),)

    losses, _ = s.forward_backward(model, _batch(hw=8), torch.Generator().manual_seed(0), step=0)
    assert seen == {torch.device("meta")} and losses["model"].device.type == "meta"


def test_absolute_rope_places_the_window_at_its_offset_in_the_video():
    """``history.relative_rope=false`` (the Relative RoPE ablation): the window's frame indices start at its
    offset in the video (latent frames), not at the history's end."""
    stage = Stage1Base(compose(["history.relative_rope=false"]))
    b = _batch()
    at_5 = ClipBatch(b.latents, b.first_latent, b.prompt_embeds, torch.full((2,), 5), b.history_frames)
    cond, _, _ = stage.condition(at_5, torch.Generator().manual_seed(0))
    expected = stage.layout.indices(2, torch.full((2,), 5))["indices_hidden_states"]
    assert torch.equal(cond["indices_hidden_states"], expected)
    assert not torch.equal(expected, stage.layout.indices(2, None)["indices_hidden_states"])


def test_a_base_with_weights_the_transformer_does_not_know_is_refused_naming_init_from():
    """A previous phase's weights that do not fit the configured transformer: the error names ``init_from``
    (where they came from) and the weights."""
    stage = Stage1Base(compose([]))
    with pytest.raises(ValueError) as err:
        stage.build_model({"bogus.weight": torch.zeros(2)})
    assert str(err.value) == "init_from: weights unknown to this Helios transformer: ['bogus.weight']"


def test_a_stage_loads_weights_through_its_loader_in_the_dtype_asked():
    """The trainer's ``init_from`` and stage 3's teacher read weights through the stage's loader, in the
    run's dtype (bf16 weights of a 14B base are half the host memory of fp32 ones)."""
    asked = []
    stage = Stage1Base(compose([]), weights=lambda source, dtype: asked.append((source, dtype)) or {})
    assert stage.load_weights("runs/s1", dtype=torch.bfloat16) == {}
    assert asked == [("runs/s1", torch.bfloat16)]
    with pytest.raises(RuntimeError, match="Stage1Base was built without a weights loader; it needs runs/s1"):
        Stage1Base(compose([])).load_weights("runs/s1", dtype=torch.float32)


def test_frame_aware_corrupt_gets_the_layouts_window(monkeypatch):
    """The reference's down-up regions are windows of the run's own window length (not the 14B default's)."""
    windows = []
    real = conditioning.frame_aware_corrupt

    def spy(*args):
        windows.append(args[5])
        return real(*args)

    monkeypatch.setattr(conditioning, "frame_aware_corrupt", spy)
    stage = Stage1Base(compose([]))
    stage.condition(_batch(), torch.Generator().manual_seed(0))
    assert windows == [stage.layout.window] and stage.layout.window != 9


@pytest.mark.parametrize("stage", ["1", "2"])
def test_the_memory_models_roles_are_the_roles_the_trainer_trains(stage):
    """``role_loras`` (what ``helios.memory`` sizes, per role) names the same roles as ``training_roles``
    (what the trainer wraps and steps, what per-role ZeRO settings name): stages 1-2 train one, ``model``."""
    from helios.stages import STAGES

    cfg = compose([f"stage={stage}"])
    trainer_stage = STAGES[int(stage)](cfg)
    model = trainer_stage.build_model(None, torch.float32)
    assert (
        list(trainer_stage.role_loras()) == [r.name for r in trainer_stage.training_roles(model)] == ["model"]
    )


def test_a_stage_used_outside_the_trainer_computes_on_the_cpu():
    """Tools and tests call a stage without ``setup`` (which names the rank's device): it computes on the
    CPU until then."""
    assert Stage1Base(compose([])).device == torch.device("cpu")
