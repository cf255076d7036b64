"""The data jobs' throughput per process (CPU, tiny models): ``helios.prepare`` with and without decoding
worker processes, and ``helios.ode_pairs`` with the tiny Helios-Mid as teacher.

    python bench/bench_data_jobs.py [--videos 32] [--out bench/results/data_jobs_cpu.json]

The 14B estimate (BENCHMARKS.md) is arithmetic on the teacher's forward passes, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

CHECKOUT = Path(__file__).resolve().parents[1]
if (CHECKOUT / "helios").is_dir():  # run from a checkout without installing
    sys.path.insert(0, str(CHECKOUT))

from helios.cli import bench_results  # noqa: E402


def prepare_rate(videos: Path, out: Path, workers: int) -> float:
    from helios.commands.prepare import run
    from helios.config.load import load_config
    from helios.config.schema import PrepareConfig

    cfg = load_config(
        {"input": str(videos), "output": str(out), "decode_workers": workers, "device": "cpu"}, PrepareConfig
    )
    start = time.perf_counter()
    report = run(cfg)
    return report["written"] / (time.perf_counter() - start)


def ode_pair_rate(shards: Path, out: Path) -> float:
    from helios.commands.ode_pairs import run
    from helios.config import compose
    from helios.config.load import load_config
    from helios.config.schema import OdePairsConfig
    from helios.tiny_recipe import complete_tiny_distill

    mid = complete_tiny_distill(compose(["stage=3"])).distill.generator_init
    settings = {"teacher": mid, "shards": str(shards), "output": str(out), "device": "cpu"}
    cfg = load_config({**settings, "max_sequence_length": 32}, OdePairsConfig)
    start = time.perf_counter()
    report = run(cfg)
    return report["pairs"] / (time.perf_counter() - start)


def main() -> None:
    from helios.data.synthetic import make_synthetic_videos

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        make_synthetic_videos(videos, args.videos, 40, 64, 64, 16, seed=0)
        rates = {
            f"prepare_clips_per_s_workers{w}": prepare_rate(videos, Path(tmp) / f"s{w}", w) for w in (0, 2)
        }
        rates["ode_pairs_per_s"] = ode_pair_rate(Path(tmp) / "s0", Path(tmp) / "ode")
    result = {
        "date": str(date.today()),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": 1,
        "videos": args.videos,
        **{k: round(v, 2) for k, v in rates.items()},
    }
    out = Path(args.out) if args.out else bench_results("data_jobs_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
