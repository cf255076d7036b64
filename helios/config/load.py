"""From Hydra's composed DictConfig to a validated :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from helios.config.schema import (
    ConfigError,
    ExportConfig,
    FixturesConfig,
    GenerateConfig,
    OdePairsConfig,
    PrepareConfig,
    TinyVaeConfig,
    TrainConfig,
)


def _config_dir() -> Path:
    """``configs/``: inside the package in an installed wheel (``helios/configs``), at the top of a
    checkout otherwise (where users edit them)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()

SCHEMA_NAME = "train_schema"


def register_schema() -> None:
    """Make :class:`TrainConfig` the base of ``configs/train.yaml`` (its first defaults entry), so
    Hydra knows every key at compose time and type-checks overrides as it merges them."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    ConfigStore.instance().store(name="ode_pairs_schema", node=OdePairsConfig)
    ConfigStore.instance().store(name="fixtures_schema", node=FixturesConfig)
    ConfigStore.instance().store(name="tiny_vae_schema", node=TinyVaeConfig)


register_schema()

_STAGE_RE = re.compile(r"^(stage)=([0-9][0-9,]*)$")


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """Rewrite the user-facing forms Hydra cannot parse as group selections.

    * ``stage=3`` / ``stage=1,2`` -> ``stage='3'`` / ``stage='1','2'`` (Hydra reads bare digits
      as integers, but config-group options are names).
    * ``data=<path>`` where the value is not a ``configs/data`` option -> ``data=latents
      data.path=<path>`` so ``python train_helios.py data=/shards`` trains on prepared shards.
    """
    data_options = {p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")}
    out: list[str] = []
    for arg in argv:
        m = _STAGE_RE.match(arg)
        if m:
            out.append("stage=" + ",".join(f"'{v}'" for v in m.group(2).split(",") if v))
            continue
        if arg.startswith("data=") and arg[5:] and arg[5:] not in data_options and "," not in arg:
            out.extend(["data=latents", f"data.path={arg[5:]}"])
            continue
        out.append(arg)
    return out


def _format_omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(str(key), msg)


def unknown_key(node, schema_type: type, prefix: str = "") -> str | None:
    """The first key of ``node`` (a plain container) that the dataclass ``schema_type`` does not have,
    by its full path. Hydra lets ``+key=value`` add a key to a typed config, and OmegaConf's to_object
    would drop it silently."""
    if not isinstance(node, dict) or not dataclasses.is_dataclass(schema_type):
        return None
    hints = typing.get_type_hints(schema_type)
    for key, value in node.items():
        if key not in hints:
            return prefix + str(key)
        found = (
            unknown_key(value, hints[key], f"{prefix}{key}.")
            if dataclasses.is_dataclass(hints[key])
            else None
        )
        if found:
            return found
    return None


# keys a saved config (a checkpoint's) may still use, and where they live now
MOVED_KEYS = {"distill.offload_shared": "parallel.node_shared_weights"}
# keys added with a new default: a saved config without them ran the behaviour from before they existed
ADDED_KEYS = {"pyramid.stage_draw": "random", "model.text_encoder.tiny_tokenizer": "bytes"}
# keys a saved config may still hold that no longer configure anything
# distill.tiny_teacher_steps: the tiny stand-ins' steps, now bench/tiny_recipe.py's TEACHER_STEPS
REMOVED_KEYS = ("distill.tiny_teacher_steps",)


def migrated(cfg: DictConfig) -> DictConfig:
    """``cfg`` (a saved config, e.g. a checkpoint's) in today's keys: moved keys where they live now, added
    keys at the behaviour from before they existed, removed keys dropped (in place; returned)."""
    for old, new in MOVED_KEYS.items():
        section, _, name = old.rpartition(".")
        node = OmegaConf.select(cfg, section)
        if isinstance(node, DictConfig) and name in node:
            OmegaConf.update(cfg, new, node.pop(name), force_add=True)
    for key, before in ADDED_KEYS.items():
        section, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, section)
        if isinstance(node, DictConfig) and name not in node:
            OmegaConf.update(cfg, key, before, force_add=True)
    for key in REMOVED_KEYS:
        section, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, section)
        if isinstance(node, DictConfig) and name in node:
            node.pop(name)
    return cfg


def load_config(cfg: DictConfig | dict, schema_type: type = TrainConfig):
    """Type-check ``cfg`` against the schema and validate ranges; raise :class:`ConfigError`."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    cfg = migrated(cfg)
    extra = unknown_key(OmegaConf.to_container(cfg, resolve=False), schema_type)
    if extra is not None:
        raise ConfigError(extra, "unknown key: the schema has no such field (check its spelling)")
    schema = OmegaConf.structured(schema_type)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _format_omegaconf_error(err) from None
    assert isinstance(obj, schema_type)
    if isinstance(obj, TrainConfig):
        if not obj.data.cache_dir:
            obj.data.cache_dir = os.path.join(os.environ.get("HELIOS_CACHE", "~/.cache/helios"), "synthetic")
        obj.data.cache_dir = os.path.expanduser(obj.data.cache_dir)
    obj.validate()
    return obj


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def compose(overrides: Sequence[str] = (), config_name: str = "train", schema_type: type = TrainConfig):
    """Compose ``configs/`` with Hydra's compose API (as the CLI does) and validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Inside a running Hydra app (e.g. stage 3 building its tiny teacher) the global instance is taken:
    # step it aside for this composition and put it back.
    global_hydra = GlobalHydra.instance()
    saved = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=normalize_overrides(overrides))
    finally:
        if saved is not None:
            global_hydra.clear()
            global_hydra.initialize(saved)
    return load_config(cfg, schema_type)


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job of a Hydra multirun (the basic sweeper's cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]
