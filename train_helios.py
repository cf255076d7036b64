"""Helios training entry point (Hydra).

python train_helios.py                       # tiny stage-1 job on CPU
python train_helios.py stage=1 stage1=init data=/path/to/shards
torchrun --nproc_per_node=8 train_helios.py stage=1 stage1=post data=/shards parallel=ddp
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from helios.config import CONFIG_DIR, ConfigError, load_config, normalize_overrides
from helios.config.entry import USER_ERRORS


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # imported after the config is valid: the trainer pulls in diffusers (~6 s), which --help, a bad
    # config and a sweep's validation never need (this script is outside the helios package's layers)
    from helios.tiny_recipe import complete_tiny_distill
    from helios.trainer import Trainer

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        cfg = complete_tiny_distill(cfg)  # the tiny stage-3 job's Base, Mid and ODE pairs
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    trainer = Trainer(
        cfg,
        hc.runtime.output_dir,
        run_name=hc.job.override_dirname if sweep else None,
        run_group=Path(hc.sweep.dir).name if sweep else None,
    )
    try:
        trainer.run()
    except USER_ERRORS as err:  # user errors (config, missing or unwritable files): one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        trainer.close()


def _check_sweep(argv: list[str]) -> None:
    """A multirun is validated whole before any job starts: every invalid combination is listed."""
    from helios.config.load import validate_sweep

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # not Hydra's flags or their values
    bad = validate_sweep(overrides)
    if bad:
        lines = [f"  {' '.join(job)}\n    -> {reason}" for job, reason in bad]
        print(
            f"error: {len(bad)} sweep combination(s) are invalid; nothing was launched:\n" + "\n".join(lines),
            file=sys.stderr,
        )
        sys.exit(2)


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = normalize_overrides(sys.argv[1:])
    if "-m" in argv or "--multirun" in argv:
        _check_sweep(argv)
    else:
        argv = shared_run_dir(argv, dict(os.environ))
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
