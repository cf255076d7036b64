"""The data jobs' throughput per process (CPU, tiny models): ``helios.prepare`` with and without decoding
worker processes, and ``helios.ode_pairs`` with the tiny Helios-Mid as teacher (its default: per caption, the
teacher's own 5-section video, Pyramid UniPC 20/20/20 with CFG; one trajectory per caption).

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


def command_config(name: str, schema: type, overrides: dict):
    """The command's config as its CLI composes it (``configs/<name>.yaml`` + ``key=value`` overrides)."""
    from hydra import compose, initialize_config_dir

    from helios.config.load import CONFIG_DIR, load_config

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        raw = compose(name, overrides=[f"{k}={v}" for k, v in overrides.items()])
    return load_config(raw, schema)


def prepare_rate(videos: Path, out: Path, workers: int) -> float:
    from helios.commands.latent_shards import run
    from helios.config.schema import PrepareConfig

    settings = {"input": videos, "output": out, "decode_workers": workers, "device": "cpu"}
    cfg = command_config("prepare", PrepareConfig, settings)
    start = time.perf_counter()
    report = run(cfg)
    return report["written"] / (time.perf_counter() - start)


def ode_pair_rate(shards: Path, out: Path) -> float:
    from helios.bench.tiny_recipe import complete_tiny_distill
    from helios.commands.teacher_ode_pairs import run
    from helios.config import compose
    from helios.config.schema import OdePairsConfig

    mid = complete_tiny_distill(compose(["stage=3"])).distill.generator_init
    settings = {"teacher": mid, "shards": shards, "output": out, "device": "cpu", "max_sequence_length": 32}
    cfg = command_config("ode_pairs", OdePairsConfig, settings)
    start = time.perf_counter()
    report = run(cfg)
    return report["pairs"] / (time.perf_counter() - start)  # trajectories (one per caption)


def main() -> None:
    from helios.data.synthetic import make_synthetic_videos
    from helios.world.shapes import RADIUS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--captions", type=int, default=4, help="captions the ODE-pair teacher rolls out")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        make_synthetic_videos(videos, args.videos, 40, 64, 64, 16, seed=0, radius=RADIUS)
        rates = {
            f"prepare_clips_per_s_workers{w}": prepare_rate(videos, Path(tmp) / f"s{w}", w) for w in (0, 2)
        }
        make_synthetic_videos(Path(tmp) / "captions", args.captions, 40, 64, 64, 16, seed=1, radius=RADIUS)
        prepare_rate(Path(tmp) / "captions", Path(tmp) / "caption_shards", 0)
        rollouts = ode_pair_rate(Path(tmp) / "caption_shards", Path(tmp) / "ode")
        rates["ode_trajectories_per_s"] = rollouts
        rates["ode_sections_per_s"] = rollouts * 5
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
