"""``metrics.jsonl`` (one JSON object per logged step) and a rank-0 progress line."""

from __future__ import annotations

import json
import math
import resource
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
        # a value that is not finite (a metric no micro-batch saw, a diverging loss) is JSON null: numeric
        # columns stay numeric in pandas and every JSON reader
        record = {"step": step, **{k: finite_or_none(v) for k, v in metrics.items()}}
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
        self.bar.set_postfix_str(f"{loss_text(metrics)} lr {metrics.get('lr', 0):.1e}")
        if step >= self.max_steps:
            self.bar.close()

    def _print(self, step: int, metrics: dict[str, float]) -> None:
        done = step - self._first_step
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.max_steps - step) / rate if rate > 0 else float("nan")
        line = (
            f"step {step}/{self.max_steps} {loss_text(metrics)} "
            f"lr {metrics.get('lr', 0):.2e} {rate:.2f} step/s eta {eta:.0f}s"
        )
        print(line, file=sys.stderr, flush=True)


def finite_or_none(value: float | torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def strict_json(obj):
    """``obj`` with every float that is not finite (NaN: a ratio of nothing) as None, so that ``json.dumps``
    writes ``null``, which strict JSON readers accept, where Python would write ``NaN``."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return finite_or_none(obj) if isinstance(obj, float) else obj


def loss_text(metrics: dict[str, float]) -> str:
    """``loss 0.1234``, or per role where a stage trains several (``loss/generator 0.1 loss/critic 0.3``:
    their sum means nothing)."""
    roles = [k for k in metrics if k.startswith("loss/")]
    if not roles:
        return f"loss {metrics.get('loss', math.nan):.4f}"
    return " ".join(f"{k} {metrics[k]:.4f}" for k in roles)


GIB = 2**30


def memory_peaks(device: torch.device) -> dict[str, float]:
    """This process's memory, GiB: on a GPU the peak allocated and reserved since the last call (the peaks
    are reset), on the host the resident set now and its peak over the process's life."""
    peaks = {}
    if device.type == "cuda":
        peaks["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        peaks["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    if Path("/proc/self/statm").exists():  # Linux
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        peaks["host_rss_gib"] = pages * resource.getpagesize() / GIB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks["host_max_rss_gib"] = max(  # the kernel updates its peak lazily: never below the current set
        max_rss * (1 if sys.platform == "darwin" else 1024) / GIB, peaks.get("host_rss_gib", 0.0)
    )
    return peaks


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
