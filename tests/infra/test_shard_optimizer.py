"""``parallel.shard_optimizer`` (ZeRO-1 under DDP): the same losses as replicated AdamW, checkpoints in the
same format (resume sharded <-> replicated, exact), and with stage 3's offload pool and TTUR."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.runs import losses, train_cli


@pytest.mark.slow
def test_sharded_adamw_trains_and_resumes_as_replicated(tmp_path):
    steps = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1"]
    train_cli([f"hydra.run.dir={tmp_path / 'full'}", "parallel.shard_optimizer=false", *steps], nproc=2)
    train_cli([f"hydra.run.dir={tmp_path / 'shard'}", "parallel.shard_optimizer=true", *steps], nproc=2)
    assert losses(tmp_path / "shard") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    # the whole AdamW state is in the checkpoint (gathered from both ranks), as without sharding
    state = torch.load(tmp_path / "shard/checkpoints/step_2/state.pt", weights_only=False)["optimizer"]
    full = torch.load(tmp_path / "full/checkpoints/step_2/state.pt", weights_only=False)["optimizer"]
    assert len(state["state"]) == len(full["state"]) > 0
    for i, s in full["state"].items():
        assert torch.allclose(state["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    # a sharded checkpoint resumes a replicated run and the other way round: steps 3-4 unchanged
    for name, source, shard in (("to_full", "shard", "false"), ("to_shard", "full", "true")):
        train_cli(
            [
                f"hydra.run.dir={tmp_path / name}",
                f"resume={tmp_path / source / 'checkpoints' / 'step_2'}",
                f"parallel.shard_optimizer={shard}",
                *steps,
            ],
            nproc=2,
        )
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "full")[2:], rel=1e-6)


@pytest.mark.slow
def test_stage3_offload_with_sharded_adamw_matches_replicated(tmp_path):
    """The paper's layout (DDP + offload pool) with the generator's and critic's AdamW sharded: TTUR still
    steps each role only on its own iterations, losses as with replicated AdamW."""
    run = [
        "stage=3",
        "trainer.max_steps=4",
        "distill.ttur=2",
        "distill.gan.start_step=0",
        "distill.offload=true",
        "trainer.batch_size=1",
        "trainer.log_every=1",
    ]
    train_cli([f"hydra.run.dir={tmp_path / 'teacher'}", "stage=3", "trainer.max_steps=1"])  # tiny teacher
    train_cli([f"hydra.run.dir={tmp_path / 'full'}", *run, "parallel.shard_optimizer=false"], nproc=2)
    train_cli([f"hydra.run.dir={tmp_path / 'shard'}", *run], nproc=2)
    assert losses(tmp_path / "shard") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
