"""Data-path benchmark (CPU): video decode throughput and latent-shard read throughput.

    python bench/bench_data.py [--out bench/results/data_cpu.json]

* decode: frames/s decoding 109-frame 384x640 H.264 clips with decord vs PyAV (one thread each);
* read: samples/s of ``LatentClipDataset`` per worker on shards of real-size samples
  (latents [16, 28, 48, 80] fp32, UMT5 embeddings [120, 4096]) and on the tiny set;
* ratio of reader throughput to the training step's consumption: the tiny job measured here, and
  the 14B step (REFERENCE.md: 3.60 s per step per H100 with one clip per GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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

STEP_14B_S = 3.60  # reference code, H100, with its Triton kernels (REFERENCE.md)
CLIPS_PER_GPU_14B = 1


def _video(path: Path, frames: int, height: int, width: int, seed: int) -> None:
    from helios.data.synthetic import write_mp4
    from helios.world.shapes import render_clip

    video, _ = render_clip(frames, height, width, torch.Generator().manual_seed(seed))
    write_mp4(path, video, 24)


def bench_decode(
    tmp: Path, n_videos: int = 3, frames: int = 109, height: int = 384, width: int = 640
) -> dict:
    import av
    import decord

    paths = []
    for i in range(n_videos):
        paths.append(tmp / f"v{i}.mp4")
        _video(paths[-1], frames, height, width, i)

    def with_decord(p: Path) -> int:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
        return reader.get_batch(list(range(len(reader)))).asnumpy().shape[0]

    def with_pyav(p: Path) -> int:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "SLICE", 1
            return sum(1 for f in container.decode(stream) if f.to_ndarray(format="rgb24") is not None)

    out = {}
    for name, fn in (("decord", with_decord), ("pyav", with_pyav)):
        fn(paths[0])  # warm-up
        rates = []
        for p in paths:
            t0 = time.perf_counter()
            n = fn(p)
            rates.append(n / (time.perf_counter() - t0))
        out[name] = {"frames_per_s": statistics.median(rates), "clip": f"{frames}x{height}x{width}"}
    return out


def _real_size_shards(tmp: Path, n: int) -> Path:
    from helios.data.shards import encode_sample, write_shard

    gen = torch.Generator().manual_seed(0)
    samples = [
        encode_sample(
            f"s{i:05d}",
            torch.randn(16, 27, 48, 80, generator=gen),  # 3 sections of 9 latents
            torch.randn(120, 4096, generator=gen),
            {"caption": "bench", "latent_format": "sections", "section_latents": 9},
        )
        for i in range(n)
    ]
    out = tmp / "real_shards"
    out.mkdir()
    write_shard(out / "shard-000000.tar", samples)
    return out


def bench_read(path: Path, num_history: int, window: int, max_seq: int, repeats: int) -> dict:
    from helios.data.dataset import LatentClipDataset

    dataset = LatentClipDataset(path, num_history, window, max_seq)
    items = [(i, 0) for i in dataset.eligible] * repeats
    dataset[items[0]]
    t0 = time.perf_counter()
    for item in items:
        dataset[item]
    elapsed = time.perf_counter() - t0
    return {
        "samples_per_s_per_worker": len(items) / elapsed,
        "samples": len(dataset),
        "bytes_per_sample": path.joinpath("shard-000000.tar").stat().st_size // max(1, len(dataset)),
    }


def tiny_step_rate(tmp: Path) -> float:
    from helios.config import compose
    from helios.infra.metrics import read_metrics
    from helios.trainer import Trainer

    cfg = compose(
        [
            "trainer.max_steps=40",
            "trainer.checkpoint_every=0",
            "validation.enabled=false",
            "trainer.progress=false",
            "trainer.log_every=1",
        ]
    )
    trainer = Trainer(cfg, tmp / "tiny_run")
    trainer.run()
    trainer.close()
    rates = [m["samples_per_s"] for m in read_metrics(tmp / "tiny_run")[5:]]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(bench_results("data_cpu.json")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        from helios.config import compose
        from helios.data.synthetic import synthetic_shards

        decode = bench_decode(tmp)
        real = bench_read(_real_size_shards(tmp, 24), 19, 9, 512, repeats=2)
        cfg = compose([])
        tiny_path = synthetic_shards(cfg, is_main=True)
        tiny = bench_read(tiny_path, 7, 3, 32, repeats=20)
        tiny_rate = tiny_step_rate(tmp)
    need_14b = CLIPS_PER_GPU_14B / STEP_14B_S
    result = {
        "date": date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, 1 thread",
        "decode": decode,
        "read_real_size": real,
        "read_tiny": tiny,
        "tiny_training_samples_per_s": tiny_rate,
        "ratio_reader_to_tiny_step": tiny["samples_per_s_per_worker"] / tiny_rate,
        "ratio_reader_to_14b_step": real["samples_per_s_per_worker"] / need_14b,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
