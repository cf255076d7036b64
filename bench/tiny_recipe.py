"""The tiny default's stage-3 inputs, made the way the reference recipe makes the real ones.

Stage 3 needs Helios-Base (the real and fake scores' base, ``distill.teacher``), Helios-Mid (the
generator's start, ``distill.generator_init``, and the ODE pairs' teacher) and, for the ODE-init phase,
ODE pairs (§3.4.2). For the tiny model, ``python train_helios.py stage=3`` makes tiny stand-ins when
those keys are unset: stage 1, then stage 2 from it (:data:`TEACHER_STEPS` steps each), then
ODE pairs from the Mid, each trained once and cached next to the synthetic shards. A real run names
its checkpoints instead. This sits above the trainer (it runs whole training jobs) and outside the library,
beside the benchmarks: ``train_helios.py`` imports it (as ``helios.bench.tiny_recipe``) only for a tiny
``stage=3`` job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from helios.commands.teacher_ode_pairs import run as make_ode_pairs
from helios.config.load import compose
from helios.config.schema import ConfigError, OdePairsConfig, SamplerConfig, TrainConfig
from helios.data.synthetic import synthetic_shards
from helios.infra.checkpoint import list_complete
from helios.trainer import Trainer

WAIT_S = 1800.0  # how long the other ranks wait for the main rank's tiny stand-ins
# part of the stand-ins' cache key: raised whenever the tiny defaults they are trained with change (2: every
# scene of the world, caption dropout, the word-piece tokenizer), so a cache made before is not reused
RECIPE_VERSION = 2
TEACHER_STEPS = 60  # the tiny Base's and Mid's training steps


def finished(run_dir: Path, steps: int) -> bool:
    """``run_dir`` holds the complete checkpoint of step ``steps``."""
    return any(step == steps for step, _ in list_complete(run_dir))


def train_run(run_dir: Path, overrides: list[str], steps: int) -> Path:
    """A training job of ``steps`` steps into ``run_dir``, reused when its final checkpoint is there."""
    if not finished(run_dir, steps):
        cfg = compose(
            [
                "validation.enabled=false",
                "trainer.progress=false",
                "resume=none",
                f"trainer.max_steps={steps}",
                f"trainer.checkpoint_every={steps}",
                *overrides,
            ]
        )
        trainer = Trainer(cfg, run_dir)
        try:
            trainer.run()
        finally:
            trainer.close()
    return run_dir


def complete_tiny_distill(cfg: TrainConfig) -> TrainConfig:
    """Fill ``distill.teacher``, ``distill.generator_init`` and (phase ``ode``) ``distill.ode_pairs`` of a
    tiny stage-3 config with the cached stand-ins, making them first where needed; other configs pass."""
    d = cfg.distill
    if cfg.stage != 3 or cfg.model.name != "tiny":
        return cfg
    if d.teacher is None:
        base = _stand_in(cfg, "tiny_base", ["stage=1"])
        mid = _stand_in(cfg, "tiny_mid", ["stage=2", f"init_from={base}"])
        d.teacher, d.generator_init = str(base), d.generator_init or str(mid)
    if d.phase == "ode" and d.ode_pairs is None:
        d.ode_pairs = str(_tiny_ode_pairs(cfg))
    return cfg


def _cache(cfg: TrainConfig, name: str, *inputs: str) -> Path:
    recipe = f"{cfg.seed}:{TEACHER_STEPS}:{cfg.history.sizes}:{':'.join(inputs)}"
    recipe += f":v{RECIPE_VERSION}"
    return Path(cfg.data.cache_dir).parent / name / f"{zlib.crc32(recipe.encode()):08x}"


@contextlib.contextmanager
def _alone():
    """Inside the block this process is a world of its own (a nested job of one process in a launch of
    several: no rendezvous with the others)."""
    keys = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _made_once(out: Path, ready: Callable[[], bool], make: Callable[[], None], what: str) -> None:
    """``make`` the tiny ``what`` once per launch: the main rank (``RANK`` 0) makes it alone while the other
    ranks wait for it to appear in ``out`` (the cache must be shared by every node)."""
    if ready():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"first tiny stage-3 run: making the tiny {what} (cached in {out})", file=sys.stderr, flush=True
        )
        started = time.monotonic()
        with _alone():
            make()
        print(f"tiny {what} ready ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        return
    deadline = time.time() + WAIT_S
    while not ready():
        if time.time() > deadline:
            raise ConfigError(
                "data.cache_dir",
                f"the main rank did not make the tiny {what} in {out} within {WAIT_S:.0f} s; is the cache "
                "shared by every node (HELIOS_CACHE)?",
            )
        time.sleep(2)


def _stand_in(cfg: TrainConfig, name: str, overrides: list[str]) -> Path:
    """Tiny Helios-Base (stage 1) or Helios-Mid (stage 2 from the Base)."""
    out, steps = _cache(cfg, name), TEACHER_STEPS
    make = lambda: train_run(out, [*overrides, f"seed={cfg.seed}"], steps)  # noqa: E731
    _made_once(out, lambda: finished(out, steps), make, name)
    return out


def _tiny_ode_pairs(cfg: TrainConfig) -> Path:
    """ODE pairs of the tiny Mid, made as the reference makes the real ones (its own 5-section T2V videos,
    CFG against the negative prompt, the linear shift), with 3 steps a stage and CFG 3."""
    teacher = cfg.distill.generator_init or cfg.distill.teacher
    out = _cache(cfg, "tiny_ode_pairs", teacher, "rollout")
    sampler = SamplerConfig(kind="pyramid", steps=[3] * len(cfg.distill.steps), guidance_scale=3.0)
    sampler.shift_type = "linear"
    pairs = OdePairsConfig(
        teacher=teacher,
        shards=str(synthetic_shards(cfg, True)),
        output=str(out),
        sampler=sampler,
        dmd_steps=list(cfg.distill.steps),
        amplify_first=cfg.validation.sampler.amplify_first,
        max_sequence_length=cfg.model.text_encoder.max_sequence_length,
    )
    _made_once(out, lambda: (out / "report.json").exists(), lambda: make_ode_pairs(pairs), "ODE pairs")
    return out
