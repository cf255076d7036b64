"""The resume contract: which settings a resumed run may change (applied from the resumed step on);
any other change is refused naming the key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from helios.config.load import migrated
from helios.config.schema import ConfigError, TrainConfig
from helios.infra import checkpoint
from helios.infra.distributed import DistInfo, broadcast_object

log = logging.getLogger(__name__)

# Settings a resumed run may change (applied from the resumed step on); any other change is refused.
CHANGEABLE_ON_RESUME = (
    "optim.lr",
    "optim.grad_clip",
    "distill.fake_lr",
    "trainer.max_steps",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.keep_last",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.max_loss",
    "logging.",
    "validation.",
    "resume",
    "data.cache_dir",
    "data.on_error",
    "parallel.timeout_minutes",
    "parallel.shard_optimizer",  # the checkpoint holds the whole optimizer state either way
    "distill.offload",  # where the frozen bases live between uses: the same computation
    "distill.offload_prefetch",
    "parallel.node_shared_weights",  # where the frozen bases live in host memory: the same computation
    "parallel.grad_comm",
)
# Set by the run itself at start-up (pinned weight sources, the tiny recipe's cached teacher and pairs).
PINNED_ON_START = (
    "init_from",
    "distill.teacher",
    "distill.generator_init",
    "distill.ode_pairs",
    "model.transformer.path",
    "model.vae.path",
    "model.text_encoder.path",
)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved_yaml: str, cfg: TrainConfig, path: Path) -> dict[str, tuple]:
    """``{key: (checkpoint's value, current value)}`` for the settings that differ from the checkpoint's
    (``path``), pinned sources left out; ConfigError for a change outside :data:`CHANGEABLE_ON_RESUME`."""
    saved = _flatten(OmegaConf.to_container(migrated(OmegaConf.create(saved_yaml))))
    current = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))}
    changed = {k: v for k, v in changed.items() if v[0] != v[1] and not k.startswith(PINNED_ON_START)}
    for key, (old, new) in changed.items():
        if not key.startswith(CHANGEABLE_ON_RESUME):
            raise ConfigError(
                key,
                f"is {new!r} but the checkpoint {path} was trained with {old!r}, and it cannot change on "
                f"resume; start a new run from it with init_from={path} (or keep {old!r})",
            )
    return changed


def record_changes(
    saved_yaml: str, cfg: TrainConfig, path: Path, step: int, run_dir: Path, is_main: bool
) -> None:
    """The resume contract (:func:`config_changes`); the accepted changes are logged and appended to the run's
    ``config_history.jsonl``."""
    changed = config_changes(saved_yaml, cfg, path)
    if changed and is_main:
        log.info("resumed with changed settings: %s", changed)
        with (run_dir / "config_history.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "from": str(path), "changes": changed}) + "\n")


def resolve_resume(cfg: TrainConfig, run_dir: Path, dist: DistInfo) -> Path | None:
    """The checkpoint to resume from (``resume``), chosen (and its files verified) by the main rank."""
    outcome = None
    if dist.is_main:
        try:
            outcome = ("ok", checkpoint.resolve_resume(cfg.resume, run_dir))
        except (FileNotFoundError, checkpoint.CorruptCheckpoint) as err:
            outcome = (type(err).__name__, str(err))
    kind, value = broadcast_object(outcome)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    if kind == "CorruptCheckpoint":
        raise checkpoint.CorruptCheckpoint(value)
    return value
