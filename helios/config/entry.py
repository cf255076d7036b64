"""One way to turn ``run(config)`` into a ``python -m helios.X key=value ...`` Hydra command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from helios.config.load import CONFIG_DIR, load_config
from helios.config.schema import ConfigError

USER_ERRORS = (ConfigError, OSError, ValueError)  # OSError: missing files, unwritable outputs


def implementation(target: str) -> Callable:
    """``"package.module:function"`` -> the function, importing its module now. The command entries
    (``helios/<command>.py``) name their implementation in ``helios.commands`` this way, so that parsing
    and validating a config never waits for torch and diffusers to import (about 6 s)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def command(config_name: str, schema: type, target: str) -> Callable[[], None]:
    """A Hydra entry point over ``configs/<config_name>.yaml`` validated against ``schema``, then
    ``implementation(target)(config)``; user errors (bad config, missing files, wrong inputs) print one
    line and exit with status 2."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)
    def main(raw: DictConfig) -> None:
        try:
            cfg = load_config(raw, schema)
            implementation(target)(cfg)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return main
