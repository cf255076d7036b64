"""No host synchronisation in the training hot loop except the one divergence read per step (and the
metrics of logged steps).

On the CPU there is no device to wait for, so the first test moves the model to the meta device: a
meta tensor has no values, so any read of a device-side value on the host (``.item()``, ``float()``,
``bool()``, a copy to the host) raises. The stage's conditioning runs on the host batch, as in training.
"""

from __future__ import annotations

import math

import pytest
import torch

from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.infra.guard import StepGuard
from helios.infra.parallel import TrainerRoleSteps
from helios.trainer import Trainer


def _host_batch(trainer: Trainer):
    return next(
        iter(
            torch.utils.data.DataLoader(
                [trainer.dataset[(i, 0)] for i in range(2)], batch_size=2, collate_fn=trainer.dataset.collate
            )
        )
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=1"],
        ["stage=2"],
        ["stage=3", "distill.gan.start_step=0"],  # rollout, DMD + GAN G, critic flow + GAN D + R1
    ],
    ids=["stage1", "stage2", "stage3-post"],
)
def test_a_training_micro_step_never_reads_a_device_value(tmp_path, monkeypatch, overrides):
    class MetaAutocast(torch.autocast):  # diffusers disables autocast on its inputs' device type
        def __init__(self, device_type: str, *args, **kwargs) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", MetaAutocast)
    cfg = compose([*overrides, "validation.enabled=false", "trainer.progress=false"])
    trainer = Trainer(complete_tiny_distill(cfg), tmp_path)
    try:
        trainer._build_data()
        trainer._build_model()
        trainer.model.to("meta")
        trainer.stage.device = torch.device("meta")
        batch = _host_batch(trainer)
        # the trainer's role steps with its divergence bookkeeping (device ops only) and plain backwards
        guard = StepGuard(torch.device("meta"))
        roles = TrainerRoleSteps(trainer.role_names, {}, None, 1, True, guard, lambda role: None)
        losses, stats = trainer.stage.forward_backward(
            trainer.model, batch, torch.Generator().manual_seed(0), roles=roles, step=0
        )
        assert losses and all(v.device.type == "meta" for v in losses.values())
        on_device = {k for k, v in stats.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"}
        # the losses' metrics stay device scalars (read only when a step is logged)
        if cfg.stage == 2:
            assert any(k.startswith("loss_stage") for k in on_device), on_device
        if cfg.stage == 3:
            assert {"loss_dmd", "loss_flow", "loss_gan_g", "loss_gan_d", "r1"} <= on_device, on_device
    finally:
        trainer.close()


def test_one_guard_read_per_step_and_metrics_only_on_logged_steps(tmp_path, monkeypatch):
    """A run of 5 steps logging every 2nd: 5 guard reads (one per step: losses, gradient norms, stop
    request together), and the metrics' all-reduce only on steps 2, 4 and 5 (the last)."""
    from helios import trainer as trainer_module

    reads, means = [], []
    original_read, original_mean = StepGuard.read, trainer_module.all_mean

    def counting_read(self, roles, extra=None):
        reads.append(sorted(extra or {}))
        return original_read(self, roles, extra)

    def counting_mean(values, device, keys=None):
        means.append(len(reads))
        return original_mean(values, device, keys)

    monkeypatch.setattr(StepGuard, "read", counting_read)
    monkeypatch.setattr(trainer_module, "all_mean", counting_mean)
    cfg = compose(
        [
            "validation.enabled=false",
            "trainer.progress=false",
            "trainer.max_steps=5",
            "trainer.log_every=2",
            "trainer.checkpoint_every=0",
        ]
    )
    trainer = Trainer(cfg, tmp_path)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert reads == [["model", "stop"]] * 5
    assert means == [2, 4, 5]


def test_guard_reads_the_worst_loss_and_names_nan_before_inf():
    guard = StepGuard(torch.device("cpu"))
    guard.observe("a", torch.tensor(3.0))
    guard.observe("a", torch.tensor(7.0))
    guard.observe("b", torch.tensor(float("inf")))
    guard.observe("b", torch.tensor(float("nan")))
    reading = guard.read(["a", "b", "c"], {"norm": torch.tensor(float("nan")), "stop": 1.0})
    assert reading.worst["a"] == 7.0 and reading.nonfinite == {"a": None, "b": "nan", "c": None}
    assert reading.worst["c"] == -math.inf  # no loss seen
    assert reading.extra == {"norm": math.inf, "stop": 1.0}  # a NaN norm reads as +inf
    again = guard.read(["a"])
    assert again.worst["a"] == -math.inf  # forgotten after its read
