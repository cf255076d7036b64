"""``parallel.grad_comm=bf16``: DDP all-reduces gradients in bf16 (torch's compression hook), the losses
track the fp32 all-reduce's; stage 3's per-role wrappers use it too."""

from __future__ import annotations

import pytest

from helios.config import ConfigError, compose
from tests.helpers.runs import losses, train_cli


@pytest.mark.slow
@pytest.mark.parametrize("stage", [["stage=1"], ["stage=3", "distill.ttur=2", "distill.gan.start_step=0"]])
def test_bf16_gradient_all_reduce_tracks_fp32(tmp_path, stage):
    steps = [*stage, "trainer.max_steps=4", "trainer.log_every=1", "trainer.checkpoint_every=0"]
    if "stage=3" in stage:  # the tiny teacher is built by a single process
        train_cli([f"hydra.run.dir={tmp_path / 'teacher'}", "stage=3", "trainer.max_steps=1"])
    for comm in ("fp32", "bf16"):
        train_cli([f"hydra.run.dir={tmp_path / comm}", f"parallel.grad_comm={comm}", *steps], nproc=2)
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(bf16) == 4 and bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16[0] == fp32[0]  # the first loss comes before any update
    assert bf16[1:] != fp32[1:]  # the updates used the rounded gradients: the hook is in place


def test_bf16_gradient_all_reduce_is_ddps():
    with pytest.raises(ConfigError, match=r"parallel\.grad_comm"):
        compose(["parallel=zero2", "parallel.grad_comm=bf16"])
