"""DeepSpeed ZeRO per role (``parallel=zero2|zero3``) on CPU with gloo: same losses as DDP, exact resume,
per-role optimiser steps in stage 3 (one engine step per role per iteration), start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helios.config import ConfigError, compose
from tests.conftest import ROOT

pytest.importorskip("deepspeed")

QUIET = ["validation.enabled=false", "trainer.progress=false", "trainer.log_every=1"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _train(args: list[str], nproc: int = 1) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    out = subprocess.run(
        [*launcher, "train_helios.py", *QUIET, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


@pytest.mark.slow
def test_two_process_zero2_zero3_match_ddp_and_resume_exactly(tmp_path):
    steps = ["trainer.max_steps=4", "trainer.checkpoint_every=2"]
    _train([f"hydra.run.dir={tmp_path / 'ddp'}", *steps], nproc=2)
    _train([f"hydra.run.dir={tmp_path / 'zero2'}", "parallel=zero2", *steps], nproc=2)
    _train([f"hydra.run.dir={tmp_path / 'zero3'}", "parallel=zero3", *steps], nproc=2)
    ddp = _losses(tmp_path / "ddp")
    assert len(ddp) == 4
    for backend in ("zero2", "zero3"):
        assert _losses(tmp_path / backend) == pytest.approx(ddp, rel=1e-5), backend
        ckpt = tmp_path / backend / "checkpoints" / "step_2"
        assert (ckpt / "COMPLETE").exists() and (ckpt / "zero" / "model").is_dir()
    # resume the zero3 run from its step-2 checkpoint in a fresh run dir: steps 3-4 are the same
    _train(
        [
            f"hydra.run.dir={tmp_path / 'resumed'}",
            "parallel=zero3",
            f"resume={tmp_path / 'zero3' / 'checkpoints' / 'step_2'}",
            *steps,
        ],
        nproc=2,
    )
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "zero3")[2:], rel=1e-6)


@pytest.mark.slow
def test_stage3_engines_per_role_step_once_per_iteration(tmp_path):
    """Critic every iteration, generator every ttur-th (11 iterations -> 11 / 3), same losses as DDP;
    the frozen real score is partitioned by its own ZeRO-3 engine."""
    common = ["stage=3", "trainer.max_steps=11", "distill.gan.start_step=0", "distill.ema_start=2"]
    _train([f"hydra.run.dir={tmp_path / 'ddp'}", *common])
    _train([f"hydra.run.dir={tmp_path / 'zero'}", *common, "parallel=zero2", "parallel.roles.real=zero3"])
    last = _last(tmp_path / "zero")
    assert (last["opt_steps_critic"], last["opt_steps_generator"]) == (11.0, 3.0)
    assert _losses(tmp_path / "zero") == pytest.approx(_losses(tmp_path / "ddp"), rel=1e-5)
    assert (tmp_path / "zero" / "checkpoints" / "step_11" / "ema.safetensors").exists()


def test_zero_settings_are_checked_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.roles\.real.*zero2 or parallel=zero3"):
        compose(["parallel.roles.real=zero3"])
    with pytest.raises(ConfigError, match=r"parallel\.zero_offload_params"):
        compose(["parallel=zero2", "parallel.zero_offload_params=true"])
    with pytest.raises(ConfigError, match=r"parallel\.backend"):
        compose(["parallel.backend=fsdp"])
    from helios.trainer import Trainer

    cfg = compose(["parallel=zero2", "parallel.roles.generator=zero3", *QUIET])
    trainer = Trainer(cfg, tmp_path)
    trainer._build_data()
    with pytest.raises(ConfigError, match=r"parallel\.roles\.generator.*its roles: model"):
        trainer._build_model()
    trainer.close()
