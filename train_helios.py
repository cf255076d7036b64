"""Helios training entry point (Hydra).

python train_helios.py                       # tiny stage-1 job on CPU
python train_helios.py stage=1 stage1=init data=/path/to/shards
torchrun --nproc_per_node=8 train_helios.py stage=1 stage1=post data=/shards parallel=ddp
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from helios.config import CONFIG_DIR, ConfigError, load_config, normalize_overrides


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from hydra.types import RunMode

    from helios.trainer import Trainer

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    trainer = Trainer(
        cfg,
        hc.runtime.output_dir,
        run_name=hc.job.override_dirname if sweep else None,
        run_group=Path(hc.sweep.dir).name if sweep else None,
    )
    try:
        trainer.run()
    except (ConfigError, FileNotFoundError, ValueError) as err:  # user errors: one line, no traceback
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = normalize_overrides(sys.argv[1:])
    if "-m" in argv or "--multirun" in argv:
        _check_sweep(argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
