"""helios.export: merged pipeline and LoRA-only exports reproduce the trained model exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import HeliosPipeline, HeliosPyramidPipeline, HeliosTransformer3DModel
from safetensors.torch import load_file

from helios.commands.diffusers_export import export
from helios.config.schema import ExportConfig
from helios.core.history import HistoryLayout
from helios.loading import load_checkpoint_model
from helios.model.transformer import build_transformer
from tests.helpers.runs import train_in_process as _train

ROOT = Path(__file__).resolve().parents[2]


def _inputs(layout: HistoryLayout) -> dict:
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(1, 16, layout.num_history, 8, 8, generator=gen)
    anchor = torch.randn(1, 16, 1, 8, 8, generator=gen)
    return dict(
        hidden_states=torch.randn(1, 16, layout.window, 8, 8, generator=gen),
        timestep=torch.tensor([400.0]),
        encoder_hidden_states=torch.randn(1, 32, 32, generator=gen),
        **layout.model_inputs(history, anchor),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("export-run")
    # alpha != rank so that the LoRA scale must survive the export
    lora = ["model.lora.enabled=true", "model.lora.alpha=16"]
    _train(["trainer.max_steps=3", "trainer.checkpoint_every=3", "optim.lr=1e-2", *lora], run)
    return run


def test_merged_pipeline_export_round_trips(trained, tmp_path):
    out = tmp_path / "pipe"
    export(ExportConfig(checkpoint=str(trained), output=str(out)))
    model, cfg, _ = load_checkpoint_model(trained, "raw")
    layout = HistoryLayout.from_config(cfg.history)
    exported = HeliosTransformer3DModel.from_pretrained(out, subfolder="transformer").eval()
    with torch.no_grad():
        ref = model(**_inputs(layout), return_dict=False)[0]
        got = exported(**_inputs(layout), return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    pipe = HeliosPipeline.from_pretrained(out)
    video = pipe(
        prompt="a red circle",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=2,
        history_sizes=cfg.history.sizes,
        num_latent_frames_per_chunk=cfg.history.window,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape[1:] == (9, 64, 64, 3) and torch.isfinite(torch.tensor(video)).all()
    info = json.loads((out / "helios_export.json").read_text())
    assert info["pipeline"] == "HeliosPipeline" and info["latent_format"] == "sections"


def test_an_export_guided_against_zero_embeddings_samples_them_in_diffusers(trained, tmp_path):
    """The tiny default guides against zero embeddings (validation.sampler.negative_prompt=null): the export
    stores their shape, the call hands them to diffusers (which would encode the empty prompt instead) and
    diffusers' latents are ours."""
    from tests.helpers.export_parity import export_and_our_latents

    out = tmp_path / "pipe"
    export(ExportConfig(checkpoint=str(trained), output=str(out)))
    model, cfg, _ = load_checkpoint_model(trained, "raw")
    assert cfg.validation.sampler.negative_prompt is None and cfg.validation.sampler.guidance_scale > 1
    stored = json.loads((out / "helios_export.json").read_text())["call"]
    assert stored["negative_prompt_embeds"] == {"zeros": [32, 32]} and "negative_prompt" not in stored
    pipe = HeliosPipeline.from_pretrained(out)
    ref, our_latents, call = export_and_our_latents(out, pipe, cfg, max_sequence_length=32)
    assert call["negative_prompt"] is None and not call["negative_prompt_embeds"].any()
    ours = our_latents(model)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    # without them diffusers guides against its own default, the empty prompt's encoding: not zeros
    _, default_negative = pipe.encode_prompt("x", do_classifier_free_guidance=True, max_sequence_length=32)
    assert default_negative.shape == call["negative_prompt_embeds"].shape and default_negative.any()


def test_lora_only_export_round_trips_every_trained_tensor(trained, tmp_path):
    out = tmp_path / "lora"
    export(ExportConfig(checkpoint=str(trained), output=str(out), lora_only=True))
    model, cfg, _ = load_checkpoint_model(trained, "raw")
    base = build_transformer(cfg.model.transformer)  # the same seeded tiny base the run started from
    pipe = HeliosPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=base)
    pipe.load_lora_weights(out)
    full = load_file(str(out / "helios_full_weights.safetensors"))
    assert {k.split(".")[0] for k in full} == {"patch_short", "patch_mid", "patch_long"}
    base.load_state_dict(full, strict=False)
    layout = HistoryLayout.from_config(cfg.history)
    with torch.no_grad():
        ref = model(**_inputs(layout), return_dict=False)[0]
        got = base.eval()(**_inputs(layout), return_dict=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_stage2_export_samples_in_diffusers_as_trained(tmp_path):
    """A stage-2 export is a HeliosPyramidPipeline with CFG-Zero*; its recorded call arguments give the
    trained layout (diffusers' default would sample the 14B one), and a CFG call, which fails in stock
    diffusers 0.42 on its CFG-Zero* step, runs once the pipeline is fixed."""
    from helios.sampling.diffusers_compat import fix_pyramid_pipeline, pipeline_call_arguments

    _train(["stage=2", "trainer.max_steps=2", "trainer.checkpoint_every=2"], tmp_path / "run")
    out = tmp_path / "pipe"
    export(ExportConfig(checkpoint=str(tmp_path / "run"), output=str(out)))
    pipe = HeliosPyramidPipeline.from_pretrained(out)
    assert pipe.config.is_cfg_zero_star and pipe.scheduler.config.stages == 3
    call = pipeline_call_arguments(out)
    assert call == {
        "history_sizes": [4, 2, 1],
        "num_latent_frames_per_chunk": 3,
        "guidance_scale": 5.0,
        "negative_prompt": "",
        "pyramid_num_inference_steps_list": [3, 3, 3],
    }
    args = dict(prompt="x", height=64, width=64, num_frames=18, max_sequence_length=32, output_type="latent")
    with pytest.raises(RuntimeError, match="view size is not compatible"):  # diffusers' own defect
        pipe(**args, **call, generator=torch.Generator().manual_seed(0))
    fix_pyramid_pipeline(pipe)
    latents = pipe(**args, **call, generator=torch.Generator().manual_seed(0)).frames
    assert latents.shape == (1, 16, 6, 8, 8) and torch.isfinite(latents).all()  # two sections of 3


def test_export_cli_errors(tmp_path, trained):
    proc = subprocess.run(
        [sys.executable, "-m", "helios.export", f"checkpoint={tmp_path}", f"output={tmp_path}/o"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "helios.export",
            f"checkpoint={trained}",
            f"output={tmp_path}/o",
            "weights=ema",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no EMA" in proc.stderr


def test_export_refuses_a_non_empty_folder_and_replaces_it_whole(trained, tmp_path, monkeypatch):
    import helios.commands.diffusers_export as export_module

    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    with pytest.raises(ValueError, match=r"not empty.*overwrite=true"):
        export(ExportConfig(checkpoint=str(trained), output=str(out), lora_only=True))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "check_export", broken)  # a failed write leaves the old folder
    with pytest.raises(OSError, match="disk full"):
        export(ExportConfig(checkpoint=str(trained), output=str(out), lora_only=True, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob("exp.tmp-*"))
    monkeypatch.undo()
    export(ExportConfig(checkpoint=str(trained), output=str(out), lora_only=True, overwrite=True))
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" not in names and "pytorch_lora_weights.safetensors" in names  # replaced, not mixed
