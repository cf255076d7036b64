"""Sampler benchmark: end-to-end frames/s, the share of DiT / VAE decode / text encoding, and the
per-section DiT time at sections 1, 10 and 40 (constant history token budget, paper Figure 7).

    python bench/bench_sampler.py [--sections 40] [--out bench/results/sampler_cpu.json]

Runs the tiny model on CPU by default; on a GPU pass ``--device cuda`` (any model config works, e.g.
``--overrides model=wan14b model.transformer.source=random`` for 14B shapes with random weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

CHECKOUT = Path(__file__).resolve().parents[1]
if (CHECKOUT / "helios").is_dir():  # run from a checkout without installing
    sys.path.insert(0, str(CHECKOUT))

from helios.cli import bench_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", default=str(bench_results("sampler_cpu.json")))
    args = parser.parse_args()

    from helios.config import compose
    from helios.config.schema import SamplerConfig
    from helios.core.history import HistoryLayout
    from helios.model.encoders import build_text_encoder, build_vae
    from helios.model.transformer import build_transformer
    from helios.sampling.decode import section_frames
    from helios.sampling.pipeline import generate_video

    cfg = compose(args.overrides)
    device = torch.device(args.device)
    transformer = build_transformer(cfg.model.transformer).eval().to(device)
    vae = build_vae(cfg.model.vae).to(device)
    tokenizer, text = build_text_encoder(cfg.model.text_encoder)
    text.to(device)
    layout = HistoryLayout.from_config(cfg.history)
    h = w = cfg.data.synthetic.height
    first, later = section_frames(layout.window, cfg.data.latent_format)
    num_frames = first + (args.sections - 1) * later
    sampler = SamplerConfig(kind="unipc", steps=[args.steps], guidance_scale=5.0)
    t0 = time.perf_counter()
    result = generate_video(
        transformer,
        vae,
        tokenizer,
        text,
        layout,
        sampler,
        [(0, "a red circle")],
        num_frames,
        h,
        w,
        torch.Generator().manual_seed(0),
        cfg.model.text_encoder.max_sequence_length,
        latent_format=cfg.data.latent_format,
    )
    total = time.perf_counter() - t0
    per = result.stats["timing_s"]["per_section_dit"]
    timing = result.stats["timing_s"]

    def around(k: int) -> float:  # median of 3 sections around section k (1-based)
        lo = max(0, k - 2)
        return statistics.median(per[lo : lo + 3])

    out = {
        "date": date.today().isoformat(),
        "device": str(device) + ("" if device.type == "cpu" else f" {torch.cuda.get_device_name()}"),
        "torch": torch.__version__,
        "model": cfg.model.name,
        "frames": result.stats["frames"],
        "sections": args.sections,
        "steps_per_section": args.steps,
        "frames_per_s": result.stats["frames"] / total,
        "share": {k: timing[k] / total for k in ("dit", "vae_decode", "text")},
        "section_dit_s": {"1": around(1), "10": around(10), str(args.sections): around(args.sections)},
        "history_tokens_per_section": "constant by construction: history buffer of "
        f"{layout.num_history} latent frames + anchor, whatever the video length",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
