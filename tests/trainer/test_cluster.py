"""The cluster rehearsal tier (CPU, gloo): what only shows with several processes, nodes that come and go,
signals and launches (marked slow; docs/operations.md).

* a checkpoint resumes on another world size (2 -> 1, 1 -> 2) under ddp, zero2 and zero3 with every role,
  the EMA, the AdamW moments, the LR position and the data position it was written with;
* 4 processes as 2 "nodes" x 2 through a c10d rendezvous, a worker killed mid-run, the job resumed on 2;
* SIGTERM mid-interval: every rank saves at the next step boundary, the run continues from there;
* a second run into a live run dir is refused and harms nothing;
* the launcher started twice makes two runs, not one continued.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helios.infra.checkpoint import list_complete
from helios.infra.distributed import free_port
from helios.infra.zero import to_universal
from tests.helpers.runs import ROOT, metrics, train_cli

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["validation.enabled=false", "trainer.progress=false", "trainer.log_every=1"]
STAGE3 = ["stage=3", "trainer.batch_size=1", "distill.gan.start_step=0", "distill.ema_start=0"]
STAGE3 += ["trainer.global_batch_size=2"]  # 1 rank: accumulation 2; 2 ranks: 1


def _probe(run: Path, out: Path, nproc: int, overrides: list[str]) -> dict:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*launcher, "tests/helpers/elastic_probe.py", str(run), str(out), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False) | {"log": proc.stdout + proc.stderr}


def _expected_moments(checkpoint: Path, backend: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The AdamW moments a checkpoint holds, whole, read independently of the trainer: under DDP from
    ``state.pt`` (by index), under ZeRO from DeepSpeed's universal conversion of its partitions."""
    if backend == "ddp":
        state = torch.load(checkpoint / "state.pt", weights_only=False)["optimizer"]["state"]
        return {f"{i}.{k}": m[k].float() for i, m in state.items() for k in ("exp_avg", "exp_avg_sq")}
    to_universal(checkpoint / "zero", tmp)
    out = {}
    for role in (p for p in tmp.iterdir() if p.is_dir()):
        for param in (p for p in (role / "zero").iterdir() if p.is_dir()):
            for key in ("exp_avg", "exp_avg_sq"):
                value = torch.load(param / f"{key}.pt", weights_only=False)
                out[f"{role.name}/{param.name}.{key}"] = value["param"] if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize(
    ("backend", "before", "after"),
    [("ddp", 2, 1), ("ddp", 1, 2), ("zero2", 2, 1), ("zero2", 1, 2), ("zero3", 2, 1), ("zero3", 1, 2)],
)
def test_resume_on_another_world_size_keeps_every_state(tmp_path, backend, before, after):
    """Stage 3 (generator, critic, GAN heads, EMA) trained 2 steps on ``before`` ranks, resumed on ``after``:
    the resumed trainer holds the checkpoint's weights, EMA and AdamW moments exactly, its step, optimizer
    steps per role, learning rates, the global batch (accumulation recomputed) and data position."""
    run = tmp_path / "run"
    common = [*QUIET, *STAGE3, f"parallel={backend}", "trainer.checkpoint_every=2"]
    train_cli([*common, "trainer.max_steps=2", f"hydra.run.dir={run}"], nproc=before)
    (checkpoint,) = [p for _, p in list_complete(run)]
    resumed = _probe(run, tmp_path / "probe.pt", after, [*common, "trainer.max_steps=4"])
    assert f"resuming on {after} ranks (the checkpoint: {before})" in resumed["log"]
    objects = torch.load(checkpoint / "state.pt", weights_only=False)
    assert resumed["world_size"] == after and resumed["step"] == 2
    assert resumed["opt_steps"] == objects["opt_steps"] == {"generator": 1, "critic": 2}
    assert resumed["lrs"] == pytest.approx([1e-3, 2e-4])  # generator, critic (TTUR's two rates)
    assert resumed["global_batch"] == 2 and resumed["consumed"] == 4  # 2 steps of the global batch
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert saved.keys() == resumed["weights"].keys()
    assert all(torch.equal(saved[k], resumed["weights"][k]) for k in saved)
    ema = load_file(str(checkpoint / "ema.safetensors"))
    assert ema and all(torch.equal(ema[k], resumed["ema"][k]) for k in ema)
    expected = _expected_moments(checkpoint, backend, tmp_path / "universal")
    assert expected.keys() == resumed["moments"].keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(resumed["moments"][name], value.reshape(resumed["moments"][name].shape))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.5)


def test_a_node_lost_mid_run_resumes_on_the_nodes_left(tmp_path):
    """4 processes as 2 nodes x 2 (two torchrun agents, one c10d rendezvous): a worker of the second node is
    killed; the job stops (the survivors' collectives fail fast) and the same command on one node of 2
    processes continues from the newest checkpoint with the accumulation doubled, to the end."""
    run = tmp_path / "run"
    env = {
        **os.environ, "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "RDZV_ID": "lost-node", "OMP_NUM_THREADS": "1",
        "HELIOS_PYTHON": sys.executable,
    }  # fmt: skip
    common = [*QUIET, "trainer.checkpoint_every=4", "parallel.timeout_minutes=0.5", f"hydra.run.dir={run}"]
    cmd = ["bash", "launch/torchrun.sh", *common, "trainer.max_steps=100000"]
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        _wait_for(lambda: len(list_complete(run)) >= 2, 300, "no checkpoint from the 4-process run")
        os.kill(_children(agents[1].pid)[-1], signal.SIGKILL)  # a worker of the second "node" dies
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert all(a.returncode != 0 for a in agents), "\n".join(outputs)
    newest = list_complete(run)[-1][0]
    out = train_cli([*common, f"trainer.max_steps={newest + 4}"], nproc=2)
    assert "resuming on 2 ranks (the checkpoint: 4): gradient accumulation 1 -> 2" in out.stdout
    assert f"resumed from {run}/checkpoints/step_{newest} at step {newest}" in out.stdout + out.stderr
    assert list_complete(run)[-1][0] == newest + 4
    assert json.loads((list_complete(run)[-1][1] / "meta.json").read_text())["world_size"] == 2


def test_sigterm_mid_interval_checkpoints_every_rank_at_the_next_step(tmp_path):
    """SIGTERM (scancel, pre-emption) to a 2-process torchrun: both ranks save at the same step boundary,
    between two checkpoint_every points, the exit status says so (EXIT_STATUS: 143), and the same command
    continues from that step."""
    run = tmp_path / "run"
    common = [*QUIET, "trainer.checkpoint_every=100000", f"hydra.run.dir={run}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    agent = subprocess.Popen(
        [*launcher, "train_helios.py", *common, "trainer.max_steps=100000"], cwd=ROOT, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 5, 300, "no steps")
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=120)[0]
    finally:
        agent.kill()
    (step, checkpoint), *_ = list_complete(run)
    assert len(list_complete(run)) == 1 and 5 <= step < 100000, output
    assert {p.name for p in checkpoint.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert "stop (SIGTERM): checkpoint at step" in output
    assert (run / "EXIT_STATUS").read_text().strip() == "143"
    out = train_cli([*common, f"trainer.max_steps={step + 2}"], nproc=2)
    assert f"resumed from {checkpoint} at step {step}" in out.stdout + out.stderr
    assert list_complete(run)[-1][0] == step + 2


def test_a_second_run_into_a_live_run_dir_is_refused_and_harms_nothing(tmp_path):
    run = tmp_path / "run"
    common = [*QUIET, f"hydra.run.dir={run}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = subprocess.Popen(
        # 4 clips a step instead of the default's 32: the mechanics in ~40 s instead of ~140 s (still ~30 s
        # of steps, far longer than the second run's start-up)
        [*launcher, "train_helios.py", *common, "trainer.max_steps=300", "trainer.checkpoint_every=100",
         "trainer.batch_size=4"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), 300, "the first run did not start")
        second = subprocess.run(
            [sys.executable, "train_helios.py", *common, "trainer.max_steps=5", "trainer.checkpoint_every=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 2 and "is in use by another live run" in second.stderr
        output = first.communicate(timeout=600)[0]
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert [s for s, _ in list_complete(run)] == [100, 200, 300]
    assert [m["step"] for m in metrics(run)] == list(range(1, 301))


def test_the_launcher_started_twice_makes_two_runs(tmp_path):
    """launch/torchrun.sh without hydra.run.dir or RDZV_ID: every launch is a new run in its own run dir (the
    run dir is named by the launch's rendezvous id), not a continuation of the previous launch."""
    env = {**os.environ, "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("RDZV_ID", None)
    root = ROOT / "outputs" / "stage1-tiny"
    before = set(root.iterdir()) if root.exists() else set()
    runs = []
    try:
        for _ in range(2):
            proc = subprocess.run(
                ["bash", "launch/torchrun.sh", *QUIET, "trainer.max_steps=1"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            runs = sorted(set(root.iterdir()) - before)
        assert len(runs) == 2, runs
        for run in runs:
            assert [m["step"] for m in metrics(run)] == [1] and not (run / "config_history.jsonl").exists()
    finally:
        for run in runs:
            subprocess.run(["rm", "-rf", str(run)], check=False)
