"""helios.ode_pairs: stage-boundary states from a stage-2 teacher, resumable shards."""

import hashlib
import json

import torch
from diffusers import HeliosScheduler

from helios.commands.ode_pairs import run
from helios.config import compose
from helios.config.schema import OdePairsConfig, SamplerConfig
from helios.data.ode_pair_shards import ODE_MEMBERS
from helios.data.shards import ShardIndex, scan_tar
from helios.data.synthetic import synthetic_shards
from helios.sampling import Guidance, SectionSampler
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


def test_ode_pairs_from_a_stage2_run_are_complete_and_resumable(tmp_path):
    _train(["stage=2", "trainer.max_steps=2", "trainer.checkpoint_every=2"], tmp_path / "teacher")
    base = compose([])
    shards = synthetic_shards(base, is_main=True)
    cfg = OdePairsConfig(
        teacher=str(tmp_path / "teacher"),
        shards=str(shards),
        output=str(tmp_path / "ode"),
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
