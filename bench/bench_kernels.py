"""GPU benchmark suite (paper §4.3, Table 6; REFERENCE.md's H100 anchors).

    python bench/bench_kernels.py           # on an H100/H200: writes bench/results/kernels_<gpu>.json
    python bench/bench_kernels.py --smoke   # tiny shapes on CPU (TRITON_INTERPRET=1): checks the script

1. Kernels alone at Helios shapes (rows x 5120 norms; B x L x 40 heads x 128 RoPE): forward and
   forward+backward for eager torch, torch.compile and the Triton kernels; achieved GB/s against the
   measured device copy bandwidth (the roofline of these memory-bound ops).
2. The whole DiT at 14B shapes (random bf16 weights), 384x640, 9 noisy latent frames + the 16/2/1
   history: forward and forward+backward with LoRA and gradient checkpointing, baseline diffusers vs
   patched (Flash Norm + Flash RoPE [+ flash attention]); tokens/s and MFU.
3. Peak training memory vs history length: full-resolution history vs multi-term patchification.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
if (CHECKOUT / "helios").is_dir():  # run from a checkout without installing
    sys.path.insert(0, str(CHECKOUT))

from helios.cli import bench_results  # noqa: E402


def timed(fn, device, warmup=3, iters=10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device, numel: int) -> float:
    import torch

    x = torch.empty(numel, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device)
    return 2 * x.numel() * x.element_size() / t / 1e9


def bench_kernels(
    device, rows: int, dim: int, heads: int, head_dim: int, compile_ok: bool, repeats: tuple[int, int]
) -> dict:
    """``repeats``: (warmup, timed) calls of each case; (1, 1) in the smoke mode, whose times mean nothing."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.transformers.transformer_helios import apply_rotary_emb_transposed

    from helios.kernels import flash_layer_norm, flash_rms_norm, flash_rope

    dt = torch.bfloat16
    x = torch.randn(rows, dim, device=device, dtype=dt, requires_grad=True)
    w = torch.randn(dim, device=device, dtype=dt, requires_grad=True)
    q = torch.randn(1, rows, heads, head_dim, device=device, dtype=dt, requires_grad=True)
    ang = torch.randn(1, rows, head_dim // 2, device=device).repeat_interleave(2, -1)
    freqs = torch.cat([ang.cos(), ang.sin()], -1)
    cases = {
        "rms_norm": (
            lambda a: F.rms_norm(a.float(), (dim,), w.float(), 1e-6).to(dt),
            lambda a: flash_rms_norm(a, w, 1e-6),
            x,
        ),
        "layer_norm": (
            lambda a: F.layer_norm(a.float(), (dim,), eps=1e-6).to(dt),
            lambda a: flash_layer_norm(a, None, None, 1e-6),
            x,
        ),
        "rope": (lambda a: apply_rotary_emb_transposed(a, freqs), lambda a: flash_rope(a, freqs), q),
    }
    out = {}
    for name, (eager, ours, inp) in cases.items():
        impls = {"eager": eager, "triton": ours}
        if compile_ok:
            impls["compile"] = torch.compile(eager)
        out[name] = {impl: _kernel_case(fn, inp, device, repeats) for impl, fn in impls.items()}
    return out


def _kernel_case(fn, inp, device, repeats: tuple[int, int]) -> dict:
    import torch

    bytes_fwd = 2 * inp.numel() * inp.element_size()  # read + write
    grad = torch.randn_like(inp)
    f = timed(lambda: fn(inp), device, *repeats)
    fb = timed(lambda: torch.autograd.grad(fn(inp), inp, grad), device, *repeats)
    return {"fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3, "fwd_GBps": bytes_fwd / f / 1e9}


def bench_dit(device, cfg_overrides: list[str], latent_hw: tuple[int, int], steps: int) -> dict:

    from helios.config import compose
    from helios.core.history import HistoryLayout

    cfg = compose(cfg_overrides)
    h, w = latent_hw
    layout = HistoryLayout.from_config(cfg.history)
    res = {
        label: _dit_case(cfg_overrides, kernels, layout, (h, w), device, steps)
        for label, kernels in (("baseline", "torch"), ("ours", "triton"))
    }
    res["speedup_fwd_bwd"] = res["baseline"]["fwd_bwd_s"] / res["ours"]["fwd_bwd_s"]
    return res


def _dit_case(cfg_overrides, kernels: str, layout, hw, device, steps: int) -> dict:
    import torch

    from helios.config import compose
    from helios.model.lora import apply_lora
    from helios.model.transformer import build_transformer

    h, w = hw
    c = compose(
        [
            *cfg_overrides,
            f"model.kernels.norm={kernels}",
            f"model.kernels.rope={kernels}",
            "model.transformer.gradient_checkpointing=true",
        ]
    )
    model = apply_lora(
        build_transformer(c.model.transformer, c.model.kernels, c.model.attention), c.model.lora
    )
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    hist = layout.model_inputs(torch.randn(1, 16, layout.num_history, h, w), torch.randn(1, 16, 1, h, w))
    text_len = 512 if device.type == "cuda" else 32
    inputs = {
        "hidden_states": torch.randn(1, 16, layout.window, h, w),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, text_len, c.model.transformer.text_dim),
        **hist,
    }
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd():
        with torch.no_grad(), autocast:
            model(**inputs, return_dict=False)

    def fwd_bwd():
        with autocast:
            model(**inputs, return_dict=False)[0].float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tf = timed(fwd, device, warmup=1, iters=steps)
    tb = timed(fwd_bwd, device, warmup=1, iters=steps)
    tokens = layout.window * (h // 2) * (w // 2)
    params = sum(p.numel() for p in model.parameters())
    return {
        "fwd_s": tf,
        "fwd_bwd_s": tb,
        "tokens_per_s": tokens / tb,
        "mfu_fwd_bwd_vs_790TF": 6 * params * tokens / tb / 790e12,
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        rows, dim, heads, head_dim = 64, 96, 2, 16
        dit = (["model.lora.enabled=true"], (4, 4))  # the LoRA step the 14B case measures
        memory_cases = []
    else:
        rows, dim, heads, head_dim = 8640 + 2400, 5120, 40, 128
        dit = (
            [
                "model=wan14b",
                "model.transformer.source=random",
                "model.transformer.path=none",
                "stage1=init",
                "data.path=none",
            ],
            (48, 80),
        )
        memory_cases = [0, 4, 8, 16]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {
        "date": date.today().isoformat(),
        "device": gpu,
        "torch": torch.__version__,
        "copy_GBps": copy_bandwidth(device, rows * dim),
    }
    import triton

    result["triton"] = triton.__version__
    result["kernels"] = bench_kernels(
        device, rows, dim, heads, head_dim, device.type == "cuda", (1, 1) if args.smoke else (3, 10)
    )
    result["dit"] = bench_dit(device, dit[0], dit[1], 1 if args.smoke else args.steps)
    for long_frames in memory_cases:
        for multi in (True, False):
            overrides = [
                *dit[0],
                f"history.sizes=[{long_frames or 1},2,1]",
                f"history.multi_term_patch={multi}",
            ]
            try:
                r = bench_dit(device, overrides, dit[1], 1)
                result.setdefault("history_memory_runs", []).append(
                    {"long": long_frames, "multi_term": multi, "peak_GB": r["ours"]["peak_GB"]}
                )
            except torch.OutOfMemoryError:
                result.setdefault("history_memory_runs", []).append(
                    {"long": long_frames, "multi_term": multi, "peak_GB": "OOM"}
                )
                torch.cuda.empty_cache()
    out = Path(args.out or bench_results(f"kernels_{gpu.replace(' ', '_')}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
