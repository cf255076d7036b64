"""Experiment tracking with wandb (main rank only; ``metrics.jsonl`` is complete without it)."""

from __future__ import annotations

import uuid
from pathlib import Path

from omegaconf import OmegaConf

from helios.config.schema import TrainConfig


def run_name(cfg: TrainConfig, member: int | None = None) -> str:
    """``stage1-tiny``, or in a sweep ``stage1-tiny-3`` (its member number): short, the sweep's values are in
    the run's config (``overrides``) and notes, and the sweep is the run's group."""
    base = cfg.logging.name or f"stage{cfg.stage}-{cfg.phase}"
    return base if member is None else f"{base}-{member}"


class WandbTracker:
    """Logs every scalar of ``metrics.jsonl``, the resolved config, validation videos and drift plots;
    wandb samples system statistics (GPU/CPU/memory) itself. Offline mode needs no network."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, name: str, group: str | None, overrides: list[str]
    ) -> None:
        import wandb

        lg = cfg.logging
        config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.run = wandb.init(
            project=lg.project,
            entity=lg.entity,
            name=name,
            group=lg.group or group,
            job_type=f"stage{cfg.stage}-{cfg.phase}",
            tags=[f"stage{cfg.stage}", cfg.phase, cfg.model.name, *lg.tags],
            dir=str(run_dir),
            mode=lg.mode,
            config={**config, "overrides": overrides},
            notes=" ".join(overrides) or None,
            resume="allow",
            id=lg.run_id,
        )
        self.sent_keys: set[str] = set()  # what was handed to wandb (its summary updates asynchronously)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)
        self.sent_keys.update(metrics)

    def log_validation(self, step: int, videos: list[Path], reports: list[dict], fps: int) -> None:
        import wandb

        data: dict = {}
        for i, (video, report) in enumerate(zip(videos, reports)):
            data[f"val/{i}/video"] = wandb.Video(str(video), fps=fps, format="mp4")
            rows = report["drift"]["sections"]
            keys = ["delta_saturation", "delta_r_mean", "delta_g_mean", "delta_b_mean"]
            data[f"val/{i}/drift"] = wandb.plot.line_series(
                xs=list(range(len(rows))),
                ys=[[r[k] for r in rows] for k in keys],
                keys=keys,
                title=f"drift from the first section (prompt {i})",
                xname="section",
            )
        self.run.log(data, step=step)
        self.sent_keys.update(data)

    def finish(self) -> None:
        self.run.finish()


def start_tracker(
    cfg: TrainConfig, run_dir: Path, member: int | None, group: str | None, overrides: list[str]
) -> WandbTracker:
    """The run's wandb tracker; its id is kept in ``wandb_id.txt``, so a resumed run continues its curves.
    ``member``: its number in a sweep; ``overrides``: the command line's (or the sweep member's)."""
    id_file = run_dir / "wandb_id.txt"
    if cfg.logging.run_id is None:
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        cfg.logging.run_id = id_file.read_text().strip()
    return WandbTracker(cfg, run_dir, run_name(cfg, member), group, overrides)
