"""Launchers: the sbatch template on a real local Slurm (2 processes, pre-emption -> requeue -> resume) and a
2-node c10d rendezvous of two torchrun agents on loopback.

The Slurm test needs Debian's Slurm (``apt-get install slurmctld slurmd slurm-client munge``); it starts a
one-node cluster with ``launch/local_slurm.sh`` when none answers and it may (root). CI sets
``HELIOS_REQUIRE_SLURM=1`` so a missing Slurm fails there instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helios.infra.distributed import free_port
from tests.helpers.runs import ROOT, metrics, train_cli

TINY = ["validation.enabled=false", "trainer.progress=false"]


def _steps(run: Path) -> list[int]:
    return [m["step"] for m in metrics(run)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    required = os.environ.get("HELIOS_REQUIRE_SLURM") == "1"
    if not shutil.which("sbatch"):
        if required:
            pytest.fail("HELIOS_REQUIRE_SLURM=1 but sbatch is not installed")
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    try:  # a slurm.conf left by an earlier run names a controller that is gone: sinfo waits, then fails
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        answers = up.returncode == 0 and bool(up.stdout.strip())
    except subprocess.TimeoutExpired:
        answers = False
    started = None
    if not answers:
        if os.geteuid() != 0 or not shutil.which("slurmctld"):
            if required:
                pytest.fail("no Slurm cluster answers and this process cannot start one")
            pytest.skip("no Slurm cluster answers")
        started = tmp_path_factory.mktemp("slurm-state")
        out = subprocess.run(
            ["bash", str(ROOT / "launch/local_slurm.sh"), "start", str(started)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    yield
    if started is not None:
        subprocess.run(["bash", str(ROOT / "launch/local_slurm.sh"), "stop", str(started)], check=False)


def _slurm_diagnostics(job: str) -> str:
    """The job's record and the daemons' last log lines, for a failure message."""
    job_info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    logs = ""
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists():
        for line in conf.read_text().splitlines():
            if line.startswith(("SlurmctldLogFile=", "SlurmdLogFile=")):
                path = Path(line.split("=", 1)[1])
                if path.exists():
                    logs += f"\n--- {path}\n" + "\n".join(path.read_text().splitlines()[-15:])
    return f"\n--- scontrol show job {job}\n{job_info}{logs}"


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def test_sbatch_template_requeues_on_preemption_and_resumes(slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "slurm.log"
    env = {
        **os.environ,
        "HELIOS_NPROC_PER_NODE": "2",
        "HELIOS_RUN_DIR": str(run),
        "HELIOS_PYTHON": os.environ.get("PYTHON", shutil.which("python") or "python"),
    }
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--output={log}",
                "--chdir",
                str(ROOT),
                "launch/helios.sbatch",
                "trainer.max_steps=600",
                "trainer.checkpoint_every=1000",  # no periodic checkpoint: only the pre-emption's
                "trainer.log_every=20",
                "trainer.batch_size=4",  # the requeue's mechanics: 4 clips a step, not 32 (150 s, not 345)
                *TINY,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        assert _job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()
        time.sleep(0.3)
    before = _steps(run)[-1]
    # Slurm's pre-emption / time-limit warning: SIGUSR1 to the batch script (the template's --signal)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    while "restart 1" not in log.read_text() and _job_state(job) != "PENDING":
        assert time.time() < deadline + 60, log.read_text()
        time.sleep(0.2)
    # Slurm delays a requeued job's start (BeginTime); a test need not wait that long, but a start in the
    # second the old run's credential was revoked is refused by slurmd ("Job credential revoked": FAILED)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=False)
    while _job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline + 240, log.read_text()
        time.sleep(1)
    text = log.read_text()
    assert _job_state(job) in ("COMPLETED", "GONE"), text + _slurm_diagnostics(job)
    assert "checkpoint written" in text and "requeueing job" in text and "(restart 1)" in text, text
    # the requeued job resumed from the checkpoint the pre-emption asked for, mid-interval: no step lost
    resumed = int(text.split("resumed from")[1].split("step_")[1].split()[0])
    assert before <= resumed < 600 and "ddp over 2 rank(s)" in text
    assert not (run / "STOP").exists()
    steps = _steps(run)
    assert steps[-1] == 600 and (run / "checkpoints/step_600/COMPLETE").exists()
    assert before in steps  # logged before the pre-emption, kept in the same metrics.jsonl


def test_srun_starts_ranks_without_torchrun(slurm, tmp_path, python):
    """``srun -n2 python train_helios.py``: each task takes rank / world / master from Slurm's variables."""
    run = tmp_path / "run"
    srun = ["srun", "-N1", "-n2", "--kill-on-bad-exit=1", python]
    out = train_cli([f"hydra.run.dir={run}", "trainer.max_steps=2"], timeout=300, launcher=srun)
    assert "ddp over 2 rank(s)" in out.stdout and _steps(run) == [1, 2]


def test_two_node_rendezvous_on_loopback(tmp_path, python):
    """Two torchrun agents (``launch/torchrun.sh`` as two nodes, 1 process each) meet through c10d."""
    run = tmp_path / "run"
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": "test",
        "HELIOS_PYTHON": python,
    }
    cmd = [
        "bash",
        "launch/torchrun.sh",
        f"hydra.run.dir={run}",
        "trainer.max_steps=3",
        "trainer.log_every=1",
        *TINY,
    ]
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    assert any("ddp over 2 rank(s)" in o for o in outputs), "\n".join(outputs)
    assert _steps(run) == [1, 2, 3]


def test_accelerate_launch_starts_the_trainer(tmp_path, python):
    """``accelerate launch`` is a launcher too (its environment is torchrun's)."""
    run = tmp_path / "run"
    accelerate = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]
    out = train_cli([f"hydra.run.dir={run}", "trainer.max_steps=2"], timeout=300, launcher=accelerate)
    assert "ddp over 2 rank(s)" in out.stdout and _steps(run) == [1, 2]


def test_ranks_without_run_dir_share_one_run_dir(tmp_path, python):
    """No ``hydra.run.dir``: the default ``outputs/...`` is named by the launch, not by each process's clock,
    so ranks that start in different seconds still write one run (a checkpoint holds both ranks' files)."""
    launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = [str(ROOT / "tests/helpers/skewed_start.py"), str(ROOT / "train_helios.py")]
    out = subprocess.run(
        [*launcher, *script, "trainer.max_steps=2", "trainer.checkpoint_every=2", *TINY],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run,) = (tmp_path / "outputs" / "stage1-tiny").iterdir()
    ckpt = run / "checkpoints" / "step_2"
    assert (ckpt / "COMPLETE").exists()
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_shared_run_dir_names_the_launch():
    from train_helios import shared_run_dir

    argv = ["trainer.max_steps=2"]
    assert shared_run_dir(argv, {}) == argv  # one process: Hydra's timestamped default
    torchrun = shared_run_dir(argv, {"TORCHELASTIC_RUN_ID": "abc"})
    assert torchrun[-1] == "hydra.run.dir=outputs/stage${stage}-${phase}/abc"
    srun = shared_run_dir(argv, {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "42"})
    assert srun[-1].endswith("/slurm-42")
    given = [*argv, "hydra.run.dir=/runs/x"]
    assert shared_run_dir(given, {"TORCHELASTIC_RUN_ID": "abc"}) == given


def test_a_hung_collective_fails_within_the_configured_timeout(tmp_path, python):
    """parallel.timeout_minutes bounds how long a rank waits for the others: rank 1 never joins a
    collective rank 0 enters, and the job fails within the timeout instead of blocking for 30 minutes."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, sys, time, torch, torch.distributed as dist\n"
        "from helios.config import compose\n"
        "from helios.infra.distributed import setup\n"
        "cfg = compose(['parallel.timeout_minutes=0.1'])\n"
        "info = setup(cfg.parallel, cfg.trainer)\n"
        "if info.rank == 0:\n"
        "    dist.all_reduce(torch.ones(1))\n"
        "else:\n"
        "    time.sleep(60)\n"
    )
    started = time.monotonic()
    out = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode != 0
    assert time.monotonic() - started < 55  # failed at the 6 s timeout, before rank 1 would wake up
