"""Start ``train_helios.py`` in a subprocess (plain or under torchrun) and read its run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["validation.enabled=false", "trainer.progress=false", "trainer.log_every=1"]
# the synthetic set of the tiny phases other than stage 1's default (8 clips, just long enough for one full
# history): for tests of mechanics that count clips or shards, built in seconds
SMALL_WORLD = ["data.synthetic.num_videos=8", "data.synthetic.sections=null"]


def train_cli(
    args: list[str], nproc: int = 1, timeout: int = 900, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run the trainer with ``args`` (after the quiet defaults); fail with its output tail if it fails.

    ``launcher``: the command line before ``train_helios.py`` (e.g. srun ... python); default python, or
    torchrun with ``nproc`` processes."""
    if launcher is None:
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run(
        [*launcher, "train_helios.py", *QUIET, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def train_in_process(overrides: list[str], run_dir: Path) -> list[dict]:
    """Run the trainer in this process with ``overrides`` (after quiet defaults); its metrics.jsonl."""
    from helios.bench.tiny_recipe import complete_tiny_distill
    from helios.config import compose
    from helios.infra.metrics import read_metrics
    from helios.trainer import Trainer

    cfg = compose(["validation.enabled=false", "trainer.progress=false", "trainer.log_every=1", *overrides])
    trainer = Trainer(complete_tiny_distill(cfg), run_dir)
    try:
        trainer.run()
    finally:
        trainer.close()
    return read_metrics(run_dir)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run)]
