"""Operations: wandb, sweeps, Slurm env, the helios command, ablation switches, error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helios.cli import main as helios_main
from helios.config import compose
from helios.config.load import sweep_jobs
from helios.core.history import HistoryLayout
from helios.infra.distributed import first_host, slurm_env
from helios.infra.metrics import read_metrics
from helios.infra.tracking import run_name
from helios.model.transformer import build_transformer
from helios.trainer import Trainer
from tests.helpers.runs import train_cli

ROOT = Path(__file__).resolve().parents[2]


def test_wandb_offline_logs_every_scalar_the_config_and_videos(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        [
            "logging.wandb=true",
            "logging.mode=offline",
            "trainer.max_steps=2",
            "trainer.log_every=1",
            "trainer.checkpoint_every=0",
            "trainer.progress=false",
        ]
    )
    trainer = Trainer(cfg, tmp_path, sweep_member=2, run_group="sweep", overrides=["seed=3"])
    trainer.run()
    tracker = trainer.tracker
    assert tracker.run.name == "stage1-tiny-2" and tracker.run.config["history"]["sizes"] == [4, 2, 1]
    assert tracker.run.config["overrides"] == ["seed=3"] and tracker.run.notes == "seed=3"
    trainer.close()
    last = read_metrics(tmp_path)[-1]
    missing = set(last) - {"step"} - tracker.sent_keys
    assert not missing, missing
    assert {"val/0/video", "val/0/drift"} <= tracker.sent_keys
    assert list(tmp_path.glob("wandb/*/files/media/videos/val/0/*.mp4"))
    assert list(tmp_path.glob("wandb/*/files/media/table/val/0/*drift*.json"))
    assert (tmp_path / "wandb_id.txt").read_text().strip() == tracker.run.id  # a resumed run reuses it


def test_run_names_are_short_and_number_sweep_members():
    cfg = compose([])
    assert run_name(cfg) == "stage1-tiny" and run_name(cfg, 3) == "stage1-tiny-3"
    cfg.logging.name = "corrupt-sweep"
    assert run_name(cfg, 0) == "corrupt-sweep-0"


def test_sweep_expansion():
    jobs = sweep_jobs(["history.corrupt.p_noise=0.2,0.4", "seed=1,2"])
    assert len(jobs) == 4 and ["history.corrupt.p_noise=0.2", "seed=1"] in jobs


def _multirun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train_helios.py", "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_sweep_file_is_validated_like_the_command_line(tmp_path):
    """Members defined in a sweep file (an experiment under --config-dir with hydra.sweeper.params) are
    composed and validated before any starts, as command-line sweeps are."""
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "corrupt_sweep.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      history.corrupt.p_noise: 0.8,0.5\n"
    )
    proc = _multirun(
        f"--config-dir={tmp_path / 'conf'}", "+experiment=corrupt_sweep", f"hydra.sweep.dir={tmp_path}/sw"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 sweep combination(s) are invalid; nothing was launched" in proc.stderr
    assert "history.corrupt.p_noise=0.5" in proc.stderr and "sum to 1" in proc.stderr
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_a_failing_member_does_not_stop_the_sweep_which_ends_with_a_summary(tmp_path):
    """One member's user error (a resume path that does not exist) is printed, the next member trains, and
    the sweep ends listing the failed member and why, with exit status 1."""
    proc = _multirun(
        f"resume={tmp_path}/missing,latest", "trainer.max_steps=1", "validation.enabled=false",
        f"hydra.sweep.dir={tmp_path}/sw",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "sw" / "1")[-1]["step"] == 1  # the second member ran
    summary = proc.stderr[proc.stderr.index("error: 1 sweep member(s) failed:") :]
    assert f"resume={tmp_path}/missing" in summary and "FileNotFoundError: resume=" in summary
    assert "Traceback" not in proc.stderr


def test_invalid_sweep_launches_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train_helios.py",
            "-m",
            "history.corrupt.p_noise=0.8,0.5,0.3",
            f"hydra.sweep.dir={tmp_path}/sw",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "2 sweep combination(s) are invalid; nothing was launched" in proc.stderr
    assert "history.corrupt.p_noise=0.5" in proc.stderr and not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_valid_sweep_gives_each_member_its_run_dir(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train_helios.py",
            "-m",
            "history.corrupt.p_noise=0.2,0.6",
            "history.corrupt.p_clean=null",
            "trainer.max_steps=2",
            "validation.enabled=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i, p_clean in ((0, "0.7"), (1, "0.3")):
        assert f"p_clean: {p_clean}" in (tmp_path / str(i) / "config.yaml").read_text()
        assert read_metrics(tmp_path / str(i))[-1]["step"] == 2


def test_slurm_launcher_config_composes():
    proc = subprocess.run(
        [sys.executable, "train_helios.py", "hydra/launcher=helios_slurm", "--cfg", "hydra"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "tasks_per_node: 8" in proc.stdout and "submitit" in proc.stdout


def test_srun_environment_without_torchrun():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_ID": "4242",
    }
    got = slurm_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("5", "16", "1")
    assert got["MASTER_PORT"] == str(20000 + 4242)
    assert got["MASTER_ADDR"] in ("gpu003", first_host("gpu[003-004]"))
    assert slurm_env({**env, "WORLD_SIZE": "16"}) == {}  # torchrun already set everything
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}
    assert first_host("node7,node8") == "node7"


def test_helios_command_lists_subcommands(capsys):
    assert helios_main([]) == 0
    out = capsys.readouterr().out
    for name in ("train", "prepare", "ode-pairs", "generate", "export", "bench"):
        assert f"  {name}" in out
    assert helios_main(["nope"]) == 2


def test_history_causal_mask_keeps_history_independent_of_noisy_tokens():
    def history_states(mask: bool, noisy_seed: int) -> torch.Tensor:
        cfg = compose([f"model.transformer.history_causal_mask={mask}"])
        model = build_transformer(cfg.model.transformer).eval()
        seen = {}
        model.blocks[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
        gen = torch.Generator().manual_seed(0)
        hist = HistoryLayout(4, 2, 1, 3).model_inputs(
            torch.randn(1, 16, 7, 8, 8, generator=gen), torch.randn(1, 16, 1, 8, 8, generator=gen)
        )
        x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(noisy_seed))
        with torch.no_grad():
            model(
                hidden_states=x,
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.ones(1, 4, 32),
                **hist,
            )
        return seen["h"][:, : -3 * 16]  # the history tokens (the noisy window is 3 frames x 16 tokens)

    assert torch.equal(history_states(True, 1), history_states(True, 2))
    assert not torch.allclose(history_states(False, 1), history_states(False, 2))


def test_out_of_memory_names_the_fix(tmp_path, monkeypatch):
    cfg = compose(["trainer.max_steps=1", "validation.enabled=false", "trainer.progress=false"])
    trainer = Trainer(cfg, tmp_path)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer.stage, "forward_backward", oom)
    with pytest.raises(RuntimeError, match=r"trainer\.batch_size=1 trainer\.global_batch_size=32"):
        trainer.run()
    trainer.close()


def test_startup_summary_reports_tokens_and_memory(tmp_path):
    proc = train_cli([f"hydra.run.dir={tmp_path}", "trainer.max_steps=1"], timeout=300)
    assert "tokens per clip: 48 noisy + 37 history; per step 2,720" in proc.stdout  # 32 clips a step
    assert "memory per rank" in proc.stdout and "trainable" in proc.stdout
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
