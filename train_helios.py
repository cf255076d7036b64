"""Helios training entry point (Hydra).

python train_helios.py                       # tiny stage-1 job on CPU
python train_helios.py stage=1 stage1=init data=/path/to/shards
torchrun --nproc_per_node=8 train_helios.py stage=1 stage1=post data=/shards parallel=ddp
"""

from __future__ import annotations

import logging
import sys

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
    from helios.trainer import Trainer

    trainer = Trainer(cfg, HydraConfig.get().runtime.output_dir)
    try:
        trainer.run()
    finally:
        trainer.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
