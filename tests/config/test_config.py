"""Every config composes; bad input fails at start-up naming the key."""

import subprocess
import sys

import pytest

from helios.config import CONFIG_DIR, ConfigError, compose, normalize_overrides

REAL = ["model.transformer.path=/models/wan", "data.path=/data/shards"]


def _phases(stage: int) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / f"stage{stage}").glob("*.yaml"))


def test_default_is_the_tiny_stage1_job():
    cfg = compose([])
    assert (cfg.stage, cfg.phase, cfg.model.name, cfg.data.kind) == (1, "tiny", "tiny", "synthetic")


@pytest.mark.parametrize(("stage", "phase"), [(s, p) for s in (1, 2) for p in _phases(s)])
def test_every_stage_phase_composes(stage, phase):
    cfg = compose([f"stage={stage}", f"stage{stage}={phase}", *REAL])
    assert cfg.stage == stage and cfg.phase == phase


def _leaves(node, prefix=""):
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


PHASE_FILES = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.glob("stage[123]/*.yaml"))


@pytest.mark.parametrize("path", PHASE_FILES)
def test_phase_files_hold_only_deltas(path):
    """A phase file sets what differs from the schema defaults (Table 1/2 deltas), or what resets a value
    its parent phase (``defaults: [- init]``) changed; the stage/phase labels are kept for reading."""
    import yaml
    from omegaconf import OmegaConf

    from helios.config.schema import TrainConfig

    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    data = yaml.safe_load((CONFIG_DIR / path).read_text())
    parent = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and not entry.startswith(("/", "override")):
            parent = dict(_leaves(yaml.safe_load((CONFIG_DIR / path).with_name(f"{entry}.yaml").read_text())))
    restated = []
    for key, value in _leaves(data):
        default = schema
        for part in key.split("."):
            default = default[part]
        if value == default and key not in ("phase", "stage") and parent.get(key, default) == default:
            restated.append(key)
    assert not restated, f"{path} restates schema defaults: {restated}"


def test_table1_stage2_values():
    init = compose(["stage=2", "stage2=init", *REAL])
    assert init.model.name == "helios14b" and (init.model.lora.rank, init.model.lora.alpha) == (256, 256)
    assert (init.optim.lr, init.trainer.max_steps, init.trainer.global_batch_size) == (1e-4, 16000, 256)
    assert init.pyramid.stage_ratios == [1, 2, 1] and init.flow.timestep_sampling == "uniform"
    assert init.validation.sampler.kind == "pyramid" and init.validation.sampler.cfg_zero_star
    post = compose(["stage=2", "stage2=post", *REAL])
    assert (post.optim.lr, post.trainer.max_steps, post.trainer.global_batch_size) == (3e-5, 20000, 192)
    assert post.pyramid.stage_ratios == [1, 1, 1]
    # the reference's warm-up and LoRA sets (the paper: constant learning rate)
    assert (init.optim.schedule, init.optim.warmup_steps, post.optim.warmup_steps) == (
        "constant_with_warmup",
        1000,
        500,
    )
    assert (init.model.lora.patch_embedding, post.model.lora.patch_embedding) == (False, True)
    assert (init.model.lora.memory_patch, post.model.lora.memory_patch) == ("frozen", "lora")


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
def test_every_model_composes(model):
    cfg = compose([f"model={model}", "model.transformer.path=/m"])
    assert cfg.model.name == model


def test_table1_stage1_values():
    init = compose(["stage=1", "stage1=init", *REAL])
    assert init.model.name == "wan14b" and init.model.transformer.source == "wan"
    assert (init.optim.lr, init.model.lora.rank, init.model.lora.alpha) == (5e-5, 128, 128)
    assert (init.trainer.max_steps, init.trainer.global_batch_size, init.optim.grad_clip) == (5500, 128, 1.0)
    assert init.history.sizes == [16, 2, 1] and init.history.window == 9
    post = compose(["stage=1", "stage1=post", *REAL])
    assert (post.optim.lr, post.trainer.max_steps) == (3e-5, 7500)
    # Frame-Aware Corrupt as the released Helios-Base: the reference's reading in both phases (noise in 90 %
    # of micro-batches, level U(0, 1/3) per frame); the paper's reading (mode=paper): none in init, Table 1's
    # per-frame probabilities in post
    for phase in (init, post):
        c = phase.history.corrupt
        assert c.enabled and (c.mode, c.reference_p_clean, c.reference_p_noise) == ("reference", 0.1, 1.0)
        assert c.noise == pytest.approx([0.0, 1 / 3]) and c.downsample == [0.0, 0.1]
    assert init.history.corrupt.p_clean == 1.0
    c = post.history.corrupt
    assert (c.p_exposure, c.p_noise, c.p_downsample, c.p_clean) == (0.0, 0.8, 0.1, 0.1)
    assert (init.history.tasks.t2v, init.history.tasks.i2v, init.history.tasks.v2v_partial) == (
        0.4,
        0.0,
        0.24,
    )
    assert init.model.lora.patch_embedding and init.model.lora.init == "gaussian"
    # 14B shapes (REFERENCE.md) flow from the model config into the schema
    t = init.model.transformer
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim, t.ffn_dim) == (40, 40, 128, 13824)


def test_real_recipe_without_paths_names_the_missing_key():
    with pytest.raises(ConfigError, match=r"model\.transformer\.path"):
        compose(["stage1=init", "data.path=/d"])


def test_data_path_shorthand():
    assert normalize_overrides(["data=/x/shards"]) == ["data=latents", "data.path=/x/shards"]
    assert normalize_overrides(["data=synthetic", "stage=1", "stage=1,2"]) == [
        "data=synthetic",
        "stage='1'",
        "stage='1','2'",
    ]
    cfg = compose(["data=/x/shards"])
    assert cfg.data.kind == "latents" and cfg.data.path == "/x/shards"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("history.corrupt.p_noise=0.5", "history.corrupt"),
        ("history.tasks.t2v=0.9", "history.tasks"),
        ("optim.lr=-1", "optim.lr"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model.transformer.rope_dim=[8,8,4]", "model.transformer.rope_dim"),
        ("history.sizes=[4,2]", "history.sizes"),
        ("data.synthetic.radius=[0.3,0.2]", "data.synthetic.radius"),
        ("data.synthetic.radius=[0.2]", "data.synthetic.radius"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert key in str(err.value)


def test_wrong_type_and_unknown_key_fail_in_hydra_naming_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_stepz=3"])
    assert "max_stepz" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    ("override", "key"), [("+trainer.max_stepz=3", "trainer.max_stepz"), ("+foo=1", "foo")]
)
def test_added_unknown_key_fails_naming_it(override, key):
    """``+key=value`` (what Hydra's own error suggests) adds a key Hydra accepts; start-up refuses it."""
    with pytest.raises(ConfigError, match="unknown key") as err:
        compose([override])
    assert err.value.key == key


def test_unknown_stage_is_refused():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        compose(["stage=7"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("history.corrupt.p_clean=0.5", "history.corrupt"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.bogus=1", "bogus"),
        ("resume=/no/such/run", "resume=/no/such/run: no complete checkpoint"),
        ("data=/no/such/shards", "data.path=/no/such/shards does not exist"),
    ],
)
def test_cli_fails_before_building_anything(tmp_path, override, needle):
    proc = subprocess.run(
        [sys.executable, "train_helios.py", override, f"hydra.run.dir={tmp_path}"],
        cwd=CONFIG_DIR.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_a_saved_config_with_a_moved_key_loads_under_its_new_name():
    """Checkpoints from before ``distill.offload_shared`` became ``parallel.node_shared_weights`` (or from
    before ``pyramid.stage_draw``) resume as they ran."""
    from omegaconf import OmegaConf

    from helios.config.load import load_config, to_yaml

    saved = OmegaConf.create(to_yaml(compose(["stage=3"])))
    del saved.parallel["node_shared_weights"]
    saved.distill.offload_shared = False
    assert load_config(saved).parallel.node_shared_weights is False
    # a stage-2 run from before pyramid.stage_draw drew one stage per clip: it resumes doing so
    del saved.pyramid["stage_draw"]
    assert load_config(saved).pyramid.stage_draw == "random"
    assert load_config(OmegaConf.create(to_yaml(compose(["stage=2"])))).pyramid.stage_draw == "every"
    # a tiny run from before the word-piece tokenizer encoded its captions byte by byte: it samples so
    del saved.model.text_encoder["tiny_tokenizer"]
    assert load_config(saved).model.text_encoder.tiny_tokenizer == "bytes"
    assert compose([]).model.text_encoder.tiny_tokenizer == "words"


def test_a_saved_config_with_a_removed_key_loads_and_resumes_unchanged(tmp_path):
    """``distill.tiny_teacher_steps`` left the schema (the tiny recipe's constant): a checkpoint's config that
    still holds it loads, and resuming it with today's config is no change of setting."""
    from omegaconf import OmegaConf

    from helios.config.load import load_config, to_yaml
    from helios.infra.resume import config_changes

    cfg = compose(["stage=3"])
    saved = OmegaConf.create(to_yaml(cfg))
    saved.distill.tiny_teacher_steps = 60
    assert load_config(saved.copy()) == cfg
    assert config_changes(OmegaConf.to_yaml(saved), cfg, tmp_path) == {}
    # a key the schema never had is still refused
    saved.distill.tiny_teacher_stepz = 60
    with pytest.raises(ConfigError, match=r"distill\.tiny_teacher_stepz"):
        load_config(saved)
