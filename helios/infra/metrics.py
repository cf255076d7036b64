"""``metrics.jsonl`` (one JSON object per logged step) and a rank-0 progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


class MetricsLogger:
    """Appends ``{"step": N, "loss": ..., ...}`` lines on the main process; prints progress."""

    def __init__(
        self, run_dir: Path, enabled: bool, max_steps: int, start_step: int = 0, progress: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.max_steps = max_steps
        self.progress = progress and enabled
        self._t0 = time.monotonic()
        self._first_step = start_step
        self.bar = None  # the tqdm bar, made at the first logged step on a terminal

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            **{k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress:
            if sys.stderr.isatty():
                self._bar(step, metrics)
            else:
                self._print(step, metrics)

    def _bar(self, step: int, metrics: dict[str, float]) -> None:
        """A tqdm bar (ETA, step/s, loss) on a terminal; plain lines otherwise."""
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=self._first_step, unit="step", dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics.get('lr', 0):.1e}"
        )
        if step >= self.max_steps:
            self.bar.close()

    def _print(self, step: int, metrics: dict[str, float]) -> None:
        done = step - self._first_step
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.max_steps - step) / rate if rate > 0 else float("nan")
        line = (
            f"step {step}/{self.max_steps} loss {metrics.get('loss', float('nan')):.4f} "
            f"lr {metrics.get('lr', 0):.2e} {rate:.2f} step/s eta {eta:.0f}s"
        )
        print(line, file=sys.stderr, flush=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def micro_means(
    records: list[dict[str, float | torch.Tensor]], keys: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per key, the mean over an accumulation's micro-batches of the finite values (NaN where there is
    none), computed where the values are (no host sync: stage metrics stay tensors until logged)."""
    means = {}
    for key in keys:
        v = torch.stack(
            [
                torch.as_tensor(r.get(key, math.nan), dtype=torch.float64).to(device).reshape(())
                for r in records
            ]
        )
        seen = torch.isfinite(v)
        means[key] = torch.where(seen, v, torch.zeros_like(v)).sum() / seen.sum()  # 0 / 0: NaN
    return means
