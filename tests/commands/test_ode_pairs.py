"""helios.ode_pairs: the teacher's own trajectories (the reference's pairs) or stage-boundary states of real
clips, resumable shards; the ODE-init dataset built on them."""

import hashlib
import json

import pytest
import torch
from diffusers import HeliosScheduler

from helios.commands.teacher_ode_pairs import run
from helios.config import compose
from helios.config.schema import OdePairsConfig, SamplerConfig
from helios.data.ode_pair_shards import ODE_MEMBERS
from helios.data.shards import ShardIndex, scan_tar
from helios.data.synthetic import synthetic_shards
from helios.sampling import Guidance, SectionSampler
from tests.helpers.runs import SMALL_WORLD
from tests.helpers.runs import train_in_process as _train


def test_sampler_records_every_stage_boundary():
    sampler = SectionSampler(HeliosScheduler(use_dynamic_shifting=True), [2, 2, 2], Guidance(1.0))
    noise = sampler.initial_noise((1, 4, 2, 8, 8), torch.Generator().manual_seed(0), torch.device("cpu"))

    def velocity(x, t, e):
        return 0.5 * x

    record = []
    out = sampler(velocity, noise, torch.zeros(1), None, torch.Generator().manual_seed(1), record=record)
    assert [(k, s.shape[-1], e.shape[-1]) for k, s, e in record] == [(0, 2, 2), (1, 4, 4), (2, 8, 8)]
    assert torch.equal(record[0][1], noise) and torch.equal(record[-1][2], out)


@pytest.mark.parametrize("recorded", [None, 0, 1])
def test_a_trajectory_section_is_anchored_as_the_teacher_sampled_it(tmp_path, recorded):
    """Section k of a teacher's video is conditioned on the sections before it and the anchor the teacher
    had: the first section's first latent, or from the third section on the second section's when the
    shard records ``anchor_section`` 1 (shards written before the key: the first section's)."""
    from helios.core.history import HistoryLayout
    from helios.data.ode_pair_shards import TRAJECTORY_MEMBERS, OdeTrajectoryDataset, encode_pair
    from helios.data.shards import write_shard

    sections = [torch.full((4, 3, 2, 2), float(k + 1)) + torch.arange(3.0).view(1, 3, 1, 1) for k in range(3)]
    arrays = {"prompt_embeds": torch.zeros(2, 8)}
    for k, final in enumerate(sections):
        arrays[f"s{k}_stage0_states"] = torch.stack([torch.randn(4, 3, 2, 2), final])
        arrays[f"s{k}_stage0_t"] = torch.tensor([900.0, 500.0])
    meta = {"format": "trajectory", "sections": 3, "stages": 1, "latent_shape": [4, 3, 2, 2]}
    if recorded is not None:
        meta["anchor_section"] = recorded
    write_shard(tmp_path / "ode-0.tar", [encode_pair("a", arrays, meta)], TRAJECTORY_MEMBERS)
    dataset = OdeTrajectoryDataset(tmp_path, 1, 8, HistoryLayout(4, 2, 1, 3))
    seen = set()
    for epoch in range(24):
        sample = dataset[(0, epoch)]
        k = int((sample["history"][0, :, 0, 0] != 0).sum()) // 3  # the sections in the history
        seen.add(k)
        want = torch.zeros(4, 1, 2, 2) if k == 0 else sections[1 if recorded == 1 and k == 2 else 0][:, :1]
        assert torch.equal(sample["anchor"], want), (k, recorded)
    assert seen == {0, 1, 2}


def test_the_teachers_unconditional_input_is_the_samplers_negative_prompt_or_zeros():
    """The teacher's CFG samples against the sampler's negative prompt (as prepare encoded it, or encoded
    here when prepare encoded another), or zero embeddings when it is null (caption dropout's input)."""
    from types import SimpleNamespace

    from helios.commands.teacher_ode_pairs import unconditional_input
    from helios.model.encoders import build_text_encoder, encode_prompts

    base = compose(SMALL_WORLD)
    shards = synthetic_shards(base, is_main=True)
    tokenizer, text_encoder = build_text_encoder(base.model.text_encoder)
    model = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    got = {}
    for negative in ("", "blurry", None):
        cfg = OdePairsConfig(teacher="t", shards=str(shards), output="o", max_sequence_length=32)
        cfg.sampler.negative_prompt = negative
        got[negative] = unconditional_input(cfg, model)
    empty, blurry = encode_prompts(tokenizer, text_encoder, ["", "blurry"], 32)
    torch.testing.assert_close(got[""], empty[None])
    torch.testing.assert_close(got["blurry"], blurry[None])
    assert got[None].shape == empty[None].shape and not got[None].any() and empty.any()


def test_clip_pairs_from_a_stage2_run_are_complete_and_resumable(tmp_path):
    _train(["stage=2", "trainer.max_steps=2", "trainer.checkpoint_every=2"], tmp_path / "teacher")
    base = compose(SMALL_WORLD)
    shards = synthetic_shards(base, is_main=True)
    cfg = OdePairsConfig(
        teacher=str(tmp_path / "teacher"),
        shards=str(shards),
        output=str(tmp_path / "ode"),
        source="clips",
        sampler=SamplerConfig(kind="pyramid", steps=[2, 2, 2], guidance_scale=3.0, cfg_zero_star=True),
        max_sequence_length=32,
    )
    cfg.validate()
    report = run(cfg)
    assert report["pairs"] == 8 and report["shards"] == 1
    tar = next((tmp_path / "ode").glob("*.tar"))
    entries = scan_tar(tar, ODE_MEMBERS)
    assert len(entries) == 8
    members = set(entries[0]["members"])
    assert {f"stage{k}_{p}.npy" for k in range(3) for p in ("start", "end")} <= members
    assert {"history.npy", "anchor.npy", "noise.npy", "prompt_embeds.npy"} <= members
    index = ShardIndex([tar])
    meta = json.loads(index.read_member(0, "json"))
    assert meta["stages"] == 3 and meta["steps"] == [2, 2, 2]
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    (tmp_path / "ode" / ".progress" / f"{shards.joinpath('shard-000000.tar').stem}.json").unlink()
    tar.unlink()
    assert run(cfg)["pairs"] == 8  # the interrupted shard is redone ...
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == digest  # ... identically


def test_the_teacher_state_nearest_to_each_distilled_timestep_is_kept():
    from helios.commands.teacher_ode_pairs import keep_dmd_states

    timesteps = torch.tensor([999.0, 950.0, 900.0, 850.0, 800.0])
    states = [torch.full((1, 2), float(i)) for i in range(6)]  # before each step, then the end
    picked, kept = keep_dmd_states(timesteps, states, torch.tensor([998.5, 902.2, 833.9]))
    assert kept.tolist() == [999.0, 900.0, 850.0] and picked[:, 0, 0].tolist() == [0.0, 2.0, 3.0, 5.0]


def test_rollout_pairs_are_the_teachers_own_video_and_train_the_ode_phase_on_its_states(tmp_path):
    """source=rollout (default): per caption one 3-section T2V video of the teacher; per (section, stage) the
    states at the distilled timesteps (doubled schedule on the first section) and the stage's end. The
    ODE-init dataset conditions section k on the teacher's own sections before it, anchored as the teacher
    was (here ``anchor_from_second_section``: section 2 on section 1's first latent), and offers each
    stage's states with their timesteps."""
    from helios.core.history import HistoryLayout
    from helios.data.ode_pair_shards import OdeTrajectoryDataset, ode_pair_dataset

    _train(["stage=2", "trainer.max_steps=2", "trainer.checkpoint_every=2"], tmp_path / "teacher")
    base = compose(SMALL_WORLD)
    cfg = OdePairsConfig(
        teacher=str(tmp_path / "teacher"),
        shards=str(synthetic_shards(base, is_main=True)),
        output=str(tmp_path / "ode"),
        sampler=SamplerConfig(kind="pyramid", steps=[3, 3, 3], guidance_scale=3.0),
        sections=3,
        max_sequence_length=32,
        pairs=4,
    )
    cfg.sampler.shift_type = "linear"
    cfg.sampler.anchor_from_second_section = True
    cfg.validate()
    report = run(cfg)
    assert report["source"] == "rollout" and report["pairs"] == 8  # one shard of 8 captions covers pairs=4
    index = ShardIndex(list((tmp_path / "ode").glob("*.tar")))
    meta = json.loads(index.read_member(0, "json"))
    assert meta["format"] == "trajectory" and meta["sections"] == 3 and meta["anchor_section"] == 1
    first, later = meta["timesteps"]["s0_stage0"], meta["timesteps"]["s1_stage0"]
    assert len(first) == 4 and len(later) == 2 and first[0] == later[0]  # amplified first section
    states = index.read_array(0, "s2_stage2_states.npy")
    assert states.shape == (3, 16, 3, 8, 8)  # 2 kept states and the end, full resolution
    assert index.read_array(0, "s0_stage0_states.npy").shape == (5, 16, 3, 2, 2)
    layout = HistoryLayout.from_config(base.history)
    dataset = ode_pair_dataset(tmp_path / "ode", 3, 32, layout)
    assert isinstance(dataset, OdeTrajectoryDataset)
    finals = [index.read_array(0, f"s{k}_stage2_states.npy")[-1] for k in range(3)]
    for epoch in range(12):
        sample = dataset[(0, epoch)]
        empty = sample["history"].abs().sum() == 0
        if empty:  # section 0: a T2V start, no anchor
            assert sample["anchor"].abs().sum() == 0
            continue
        third = torch.equal(sample["history"][:, -3:], finals[1])  # section 2, after sections 0 and 1
        assert third or torch.equal(sample["history"][:, -3:], finals[0])
        assert torch.equal(sample["anchor"], finals[1 if third else 0][:, :1])  # as the teacher re-anchored
        for s in range(3):
            assert sample[f"stage{s}_t"] > 0 and sample[f"stage{s}_x"].shape == sample[f"stage{s}_end"].shape
    # data.caption_dropout zeroes the prompt of a share of the items, the rest of each item unchanged
    dropping = ode_pair_dataset(tmp_path / "ode", 3, 32, layout, caption_dropout=0.5)
    dropped = 0
    for epoch in range(16):
        plain, item = dataset[(0, epoch)], dropping[(0, epoch)]
        assert all(torch.equal(plain[k], item[k]) for k in plain if k != "prompt_embeds")
        if item["prompt_embeds"].abs().sum() == 0:
            dropped += 1
        else:
            assert torch.equal(plain["prompt_embeds"], item["prompt_embeds"])
    assert 3 <= dropped <= 13
