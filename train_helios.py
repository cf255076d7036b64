"""Helios training entry point (Hydra).

python train_helios.py                       # tiny stage-1 job on CPU
python train_helios.py stage=1 stage1=init data=/path/to/shards
torchrun --nproc_per_node=8 train_helios.py stage=1 stage1=post data=/shards parallel=ddp
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

# the caching allocator grows its segments instead of fragmenting (the memory model's runtime_overhead
# assumes it); set before torch is imported, also for `torchrun train_helios.py` without our launchers
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from helios.config import CONFIG_DIR, load_config, normalize_overrides
from helios.config.entry import USER_ERRORS
from helios.config.sweep import record_failure

# exit status of a run that did not finish: 2 = the user can fix it (config, files, a full disk; a requeue
# would fail again), 3 = the training diverged (deterministic: a requeue would diverge again), 128 + N = a
# stop signal N ended it after its checkpoint. torchrun reports any failed worker as 1, so the status is also
# written to the run dir (EXIT_STATUS, main rank), where launch/helios.sbatch reads it.
DIVERGED = 3
EXIT_STATUS = "EXIT_STATUS"


def _exit(output_dir: str, status: int) -> None:
    if os.environ.get("RANK", "0") == "0":
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / EXIT_STATUS).write_text(f"{status}\n")
    sys.exit(status)


def _train(raw: DictConfig, sweep: bool) -> int | None:
    """The run; its exit status when a stop signal ended it (after its checkpoint), else None."""
    cfg = load_config(raw)
    # imported after the config is valid: the trainer pulls in diffusers (~6 s), which --help, a bad
    # config and a sweep's validation never need (this script is outside the helios package's layers)
    from helios.trainer import Trainer

    hc = HydraConfig.get()
    if cfg.stage == 3 and cfg.model.name == "tiny":  # the tiny job's Base, Mid and ODE pairs: the demo's
        from helios.bench.tiny_recipe import complete_tiny_distill  # bootstrap lives with the benchmarks

        cfg = complete_tiny_distill(cfg)
    trainer = Trainer(
        cfg,
        hc.runtime.output_dir,
        sweep_member=hc.job.num if sweep else None,
        run_group=Path(hc.sweep.dir).name if sweep else None,
        overrides=list(hc.overrides.task),
    )
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer.stop_signals.exit_status


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(raw: DictConfig) -> None:
    """One run; a user error (config, missing or unwritable files) or a divergence is one line and a
    non-zero exit. In a sweep, a failed member is recorded and the next one runs (helios.config.sweep)."""
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        stopped = _train(raw, sweep)
    except (*USER_ERRORS, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        if not sweep:
            _exit(hc.runtime.output_dir, DIVERGED if isinstance(err, FloatingPointError) else 2)
        record_failure(Path(hc.runtime.output_dir), list(hc.overrides.task), err)
    except Exception as err:
        if not sweep:
            raise
        traceback.print_exc()
        record_failure(Path(hc.runtime.output_dir), list(hc.overrides.task), err)
    else:
        if stopped is not None:  # SIGTERM / SIGINT: the checkpoint is saved; a sweep stops here too
            _exit(hc.runtime.output_dir, stopped)


def launch_id(env: dict[str, str]) -> str | None:
    """An id that every process of one multi-process launch shares: torchrun's rendezvous run id, else the
    Slurm job (srun without torchrun). None for a single process."""
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def shared_run_dir(argv: list[str], env: dict[str, str]) -> list[str]:
    """Without ``hydra.run.dir``, each process would resolve the default's ``${now:...}`` itself, and
    processes straddling a second would write into different run dirs: name it by the launch instead."""
    run_id = launch_id(env)
    if run_id is None or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, f"hydra.run.dir=outputs/stage${{stage}}-${{phase}}/{run_id}"]


def unwritable_output(argv: list[str]) -> str | None:
    """Why the run (or sweep) dir cannot be written, checked before Hydra opens its log file there (which
    would fail with a traceback): None when a file can be created in it or in its nearest existing parent."""
    key = "hydra.sweep.dir=" if "-m" in argv or "--multirun" in argv else "hydra.run.dir="
    given = [a[len(key) :] for a in argv if a.startswith(key)]
    path = Path(given[-1]).expanduser() if given else Path.cwd()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            return None
    except OSError as err:
        return f"{key[:-1]}={path}: cannot write there ({err.strerror or err}): choose another folder"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = normalize_overrides(sys.argv[1:])
    if "-m" not in argv and "--multirun" not in argv:
        argv = shared_run_dir(argv, dict(os.environ))
    problem = None if any(a in ("-h", "--help") for a in argv) else unwritable_output(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
