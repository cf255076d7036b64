"""Hydra multirun (``-m``, sweeps): every member is composed and validated before any starts, every member
that can run runs (one member's failure does not stop the others), and the sweep ends with a summary of
the members that failed and why (exit status 1 when any did).

The members come from the command line and from sweep files alike (``hydra.sweeper.params`` in a config or
an experiment under ``--config-dir``): they are enumerated the way Hydra's basic sweeper does and composed
with the run's own config loader. Configured in ``configs/train.yaml`` as ``hydra.callbacks.sweep``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from helios.config.load import load_config, sweep_jobs
from helios.config.schema import ConfigError

FAILED = "FAILED.json"  # in a member's output dir: its overrides and its error


def member_overrides(config: DictConfig) -> list[str]:
    """A multirun's sweep arguments: ``hydra.sweeper.params`` first, then the command line's (the basic
    sweeper's order)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    return [f"{key}={value}" for key, value in params.items()] + list(task)


def invalid_members(config: DictConfig, loader: Any) -> list[tuple[list[str], str]]:
    """(overrides, reason) of every member that does not compose or validate (``loader``: Hydra's config
    loader, which knows ``--config-dir`` and the other search paths)."""
    bad = []
    for job in sweep_jobs(member_overrides(config)):
        try:
            load_config(loader.load_sweep_config(config, job))
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            bad.append((job, str(err).splitlines()[0]))
    return bad


def record_failure(output_dir: Path, overrides: Sequence[str], err: BaseException) -> None:
    """Note in a member's output dir that it failed and why (read by the sweep's summary)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    record = {"overrides": list(overrides), "error": type(err).__name__, "reason": reason}
    (output_dir / FAILED).write_text(json.dumps(record, indent=1))


def failures(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """The members of a sweep that recorded a failure, in member order."""
    found = []
    for path in sorted(sweep_dir.glob(f"*/{FAILED}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            found.append((path.parent, json.loads(path.read_text())))
        except (OSError, ValueError):
            found.append((path.parent, {"overrides": [], "error": "?", "reason": f"{path} is unreadable"}))
    return found


class SweepCallback(Callback):
    """Validate every member before the first starts; summarise the failed members at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        bad = invalid_members(config, GlobalHydra.instance().hydra.config_loader)
        if bad:
            lines = "\n".join(f"  {' '.join(job)}\n    -> {reason}" for job, reason in bad)
            head = f"error: {len(bad)} sweep combination(s) are invalid; nothing was launched:"
            print(f"{head}\n{lines}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = failures(Path(str(config.hydra.sweep.dir)))
        if not failed:
            return
        lines = [
            f"  {folder}: {' '.join(rec.get('overrides', []))}\n"
            f"    -> {rec.get('error')}: {rec.get('reason')}"
            for folder, rec in failed
        ]
        print(f"error: {len(failed)} sweep member(s) failed:\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(1)
