"""One way to turn ``run(config)`` into a ``python -m helios.X key=value ...`` Hydra command."""

from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from helios.config.load import CONFIG_DIR, load_config
from helios.config.schema import ConfigError

USER_ERRORS = (ConfigError, OSError, ValueError)  # OSError: missing files, unwritable outputs


def command(config_name: str, schema: type, run: Callable) -> Callable[[], None]:
    """A Hydra entry point over ``configs/<config_name>.yaml`` validated against ``schema``; user
    errors (bad config, missing files, wrong inputs) print one line and exit with status 2."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)
    def main(raw: DictConfig) -> None:
        try:
            run(load_config(raw, schema))
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return main
