"""python -m helios.generate from a training run: T2V, timed prompts, I2V; errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helios.config import compose
from helios.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen-run")
    cfg = compose(
        [
            "trainer.max_steps=2",
            "trainer.checkpoint_every=2",
            "validation.enabled=false",
            "trainer.progress=false",
        ]
    )
    trainer = Trainer(cfg, run)
    trainer.run()
    trainer.close()
    return run


def _generate(*args):
    return subprocess.run(
        [sys.executable, "-m", "helios.generate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_generate_t2v_and_timed_prompts_and_i2v(run_dir, tmp_path):
    import decord
    import imageio.v2 as imageio
    import numpy as np

    out = tmp_path / "t2v.mp4"
    proc = _generate(
        f"checkpoint={run_dir}",
        'prompt="a green square moving up"',
        "num_frames=40",
        f"output={out}",
        "sampler.steps=[3]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(decord.VideoReader(str(out))) == 40
    stats = json.loads(out.with_suffix(".json").read_text())
    # the tiny run trained on the section format: sections decode to 9 frames each, ceil(40 / 9) = 5
    assert stats["latent_format"] == "sections"
    # a line per section as it is done (sampled and decoded), after a line for the model's loading
    lines = [x for x in proc.stderr.splitlines() if x.startswith("t2v.mp4: section ")]
    assert [x.split(":")[1].split()[1] for x in lines] == [f"{k}/5" for k in range(1, 6)]
    assert "frames/s" in lines[0] and lines[-1].endswith("45 so far") and "loading " in proc.stderr  # 40 kept
    assert stats["sections"] == 5 and len(stats["drift"]["sections"]) == 5
    assert len(stats["timing_s"]["per_section_dit"]) == 5

    timed = tmp_path / "timed.csv"
    timed.write_text("time,prompt\n0,a red circle\n1.5,a white square\n")
    out2 = tmp_path / "timed.mp4"
    proc = _generate(
        f"checkpoint={run_dir}",
        f"timed_prompts={timed}",
        "num_frames=40",
        f"output={out2}",
        "sampler.steps=[2]",
        "sampler.interpolation_steps=2",
        "fps=8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out2.with_suffix(".json").read_text())["prompts"] == [
        [0, "a red circle"],
        [1, "a white square"],
    ]

    image = tmp_path / "first.png"
    imageio.imwrite(image, (np.random.default_rng(0).random((80, 96, 3)) * 255).astype("uint8"))
    out3 = tmp_path / "i2v.mp4"
    proc = _generate(
        f"checkpoint={run_dir}",
        "prompt=x",
        f"image={image}",
        "num_frames=12",
        f"output={out3}",
        "sampler.steps=[2]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(decord.VideoReader(str(out3))) == 13  # the image, then 12 generated frames


def test_generate_errors_and_help(run_dir, tmp_path):
    proc = _generate(f"checkpoint={tmp_path}", "prompt=x")
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    proc = _generate(f"checkpoint={run_dir}", "prompt=x", "decode=stream", f"output={tmp_path / 'x.mp4'}")
    assert proc.returncode == 2 and "decode=stream" in proc.stderr and "section latent format" in proc.stderr
    assert not (tmp_path / "x.mp4").exists()
    proc = _generate(f"checkpoint={tmp_path}")
    assert proc.returncode == 2 and "prompt" in proc.stderr
    help_text = _generate("--help").stdout
    assert "checkpoint=PATH" in help_text and "timed_prompts" in help_text


@pytest.mark.parametrize(
    ("kind", "text", "reason"),
    [
        ("timed_prompts", "time,prompt\n0,a red circle\n4\n", r"prompts.csv:3: no prompt"),
        ("timed_prompts", "time,prompt\nsoon,a red circle\n", r"prompts.csv:2: time 'soon' is not a float"),
        ("timed_prompts", "prompt\na red circle\n", r"needs the columns time,prompt \(has \['prompt'\]\)"),
        ("timed_prompts", "time,prompt\n", r"prompts.csv: no prompts"),
        ("timed_prompts", "id,prompt_index,prompt\nv,0,a cat\n", r"reference code's .*interactive_prompts="),
        ("interactive_prompts", "id,prompt_index,prompt\nv,,a cat\n", r"prompts.csv:2: no prompt_index"),
        ("prompts_file", "\n  \n", r"no prompts \(one per line\)"),
    ],
)
def test_a_bad_prompts_file_is_one_line_before_the_model_loads(tmp_path, kind, text, reason):
    """A missing column or value, a non-number, or an empty file: one line naming the file (and the line),
    exit 2, before any model is loaded (the checkpoint here does not even exist)."""
    import re

    prompts = tmp_path / "prompts.csv"
    prompts.write_text(text)
    out = tmp_path / "x.mp4"
    proc = _generate(f"checkpoint={tmp_path / 'nowhere'}", f"{kind}={prompts}", f"output={out}")
    assert proc.returncode == 2 and re.search(reason, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_generate_from_a_diffusers_model_directory(tmp_path):
    """A diffusers-format Helios pipeline directory (model_index.json) loads and generates."""
    import torch
    from diffusers import HeliosPipeline, HeliosScheduler

    from helios.commands.video_generation import run
    from helios.config.schema import GenerateConfig, SamplerConfig
    from helios.model.encoders import build_text_encoder, build_vae
    from helios.model.transformer import build_transformer

    cfg = compose([])
    tokenizer, text = build_text_encoder(cfg.model.text_encoder)
    HeliosPipeline(
        tokenizer=tokenizer,
        text_encoder=text,
        vae=build_vae(cfg.model.vae),
        scheduler=HeliosScheduler(),
        transformer=build_transformer(cfg.model.transformer),
    ).save_pretrained(tmp_path / "model")
    out = tmp_path / "out.mp4"
    gen = GenerateConfig(
        checkpoint=str(tmp_path / "model"),
        prompt="a red circle",
        num_frames=9,
        height=64,
        width=64,
        output=str(out),
        sampler=SamplerConfig(steps=[2]),
    )
    gen.validate()
    assert run(gen) == [out] and out.exists()
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["frames"] == 9 and stats["sections"] == 1  # the published 16/2/1 + 9 layout: one section
    assert stats["latent_format"] == "sections"  # a published directory: the released checkpoints' format
    (tmp_path / "model" / "helios_export.json").write_text('{"latent_format": "clip"}')
    assert run(gen) == [out]  # an export records the format its run trained on
    assert json.loads(out.with_suffix(".json").read_text())["latent_format"] == "clip"
    assert torch.isfinite(torch.tensor(stats["drift"]["sections"][0]["saturation"]))


def test_reference_interactive_prompt_csv(run_dir, tmp_path):
    """The reference code's interactive CSV (id,prompt_index,prompt[,refined_prompt]): one video per id,
    prompts in prompt_index order, each for sections_per_prompt sections, the video long enough for all."""
    from helios.commands.video_generation import read_interactive_prompts

    csv_path = tmp_path / "interactive.csv"
    csv_path.write_text(
        "id,prompt_index,prompt,refined_prompt\n"
        '6,1,"a red circle moving left",\n'
        '6,0,"a red circle moving right","a bright red circle moving right"\n'
        '8,0,"a green square",\n'
    )
    assert read_interactive_prompts(str(csv_path), 2) == [
        ("6", [(0, "a bright red circle moving right"), (2, "a red circle moving left")]),
        ("8", [(0, "a green square")]),
    ]
    out = tmp_path / "story.mp4"
    proc = _generate(
        f"checkpoint={run_dir}",
        f"interactive_prompts={csv_path}",
        "sections_per_prompt=2",
        "num_frames=9",
        f"output={out}",
        "sampler.steps=[2]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    six = json.loads((tmp_path / "story_6.json").read_text())
    assert six["sections"] == 4 and [p[1] for p in six["prompts"]][1] == "a red circle moving left"
    assert json.loads((tmp_path / "story_8.json").read_text())["sections"] == 2


def test_a_video_that_cannot_be_written_is_an_error(run_dir, tmp_path):
    """ffmpeg failing to write the mp4 (here: the path is a folder) stops the command with the file named,
    instead of reporting success."""
    out = tmp_path / "x.mp4"
    out.mkdir()
    proc = _generate(f"checkpoint={run_dir}", 'prompt="a red circle"', "num_frames=9", f"output={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"writing {out} failed" in proc.stderr and "wrote" not in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "x.json").exists()


def test_weights_trained_on_another_latent_format_are_refused_at_start(run_dir, tmp_path):
    """A published Helios directory is the section format, an export records its run's format, a run
    its data.latent_format, a Wan directory none; training on another format than the weights' stops
    at start-up naming data.latent_format (the data's meaning would change silently)."""
    from helios.config.schema import ConfigError
    from helios.infra.checkpoint import pin_source
    from helios.loading import trained_latent_format

    helios_dir, wan_dir = tmp_path / "helios", tmp_path / "wan"
    for root, kind in ((helios_dir, "HeliosTransformer3DModel"), (wan_dir, "WanTransformer3DModel")):
        (root / "transformer").mkdir(parents=True)
        (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": kind}))
    assert trained_latent_format(str(helios_dir)) == "sections"
    assert trained_latent_format(str(helios_dir / "transformer")) == "sections"
    assert trained_latent_format(str(wan_dir)) is None
    assert trained_latent_format(pin_source(str(run_dir), "init_from")) == "sections"
    (helios_dir / "helios_export.json").write_text(json.dumps({"stage": 1}))  # an export from before
    assert trained_latent_format(str(helios_dir)) == "clip"
    cfg = compose([f"init_from={helios_dir}", "trainer.max_steps=1", "validation.enabled=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=r"data\.latent_format.*trained on the clip latent format"):
            trainer.run()
    finally:
        trainer.close()
