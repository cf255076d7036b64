"""Stage-3 memory benchmark (paper §4.2): peak device memory and step time of Adversarial Hierarchical
Distillation with all roles resident (the real score a separate copy, or sharing the fake score's base:
``distill.shared_teacher``), the async offload pool, and offload + cached GAN gradients.

    python bench/bench_stage3_memory.py          # GPU, mid-size DiT: bench/results/stage3_memory_<gpu>.json
    python bench/bench_stage3_memory.py --smoke  # tiny model on CPU: checks the script (no device numbers)

Each mode runs in its own process (clean peak counters) through the real trainer. The projection for four
14B roles uses the measured bytes per parameter of each role and the largest set of roles the mode keeps
resident at once (counted by the pool), plus the generator's sharded fp32 EMA over ``--world`` ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
if (CHECKOUT / "helios").is_dir():  # run from a checkout without installing
    sys.path.insert(0, str(CHECKOUT))

from helios.cli import bench_results  # noqa: E402

MODES = {
    "separate_real": [
        "distill.shared_teacher=false",
        "distill.offload=false",
        "distill.cache_gan_grad=false",
    ],
    "resident": ["distill.offload=false", "distill.cache_gan_grad=false"],
    "offload": ["distill.offload=true", "distill.cache_gan_grad=false"],
    "offload_cached_gan": ["distill.offload=true", "distill.cache_gan_grad=true"],
}
MID = [  # ~0.5B-parameter DiT per role: big enough for weights to dominate, small enough for one GPU
    "model.transformer.num_attention_heads=12",
    "model.transformer.attention_head_dim=128",
    "model.transformer.ffn_dim=6144",
    "model.transformer.num_layers=12",
    "model.transformer.rope_dim=[44,42,42]",
    "distill.gan.layers=[3,7,11]",
    "distill.gan.dim=256",
]
PARAMS_14B = 14.0e9


def run_mode(mode: str, smoke: bool, steps: int) -> dict:
    import torch

    from helios.bench.tiny_recipe import complete_tiny_distill
    from helios.config import compose
    from helios.trainer import Trainer

    overrides = [
        "stage=3",
        "validation.enabled=false",
        "trainer.progress=false",
        "trainer.checkpoint_every=0",
        f"trainer.max_steps={steps}",
        "distill.gan.start_step=0",
        "distill.ttur=1",  # every iteration trains the generator: the memory-heaviest iteration
        *MODES[mode],
        "trainer.precision=bf16",  # frozen bases in bf16 as in a real run (CPU autocast for --smoke)
        *([] if smoke else [*MID, "trainer.device=cuda"]),
    ]
    cfg = complete_tiny_distill(compose(overrides))  # the tiny model's Base and Mid stand-ins
    run_dir = Path(f"/tmp/helios-bench-stage3-{mode}-{time.time_ns()}")
    trainer = Trainer(cfg, run_dir)
    trainer._build_data()
    trainer._build_model()
    cuda = trainer.dist.device.type == "cuda"
    roles = {r.name: r.module for r in trainer.stage.training_roles(trainer.model)}
    role_params = {n: sum(p.numel() for p in m.parameters()) for n, m in roles.items()}
    role_bytes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in roles.items()}
    frozen = {n: [p for p in m.parameters() if not p.requires_grad] for n, m in roles.items()}
    frozen_bytes_per_param = {
        n: sum(p.numel() * p.element_size() for p in ps) / max(1, sum(p.numel() for p in ps))
        for n, ps in frozen.items()
    }
    pool = trainer.stage.roles.pool
    max_resident: set[str] = set()
    if pool is not None:  # track the largest resident set across the step's phases
        activate = pool.activate

        def tracked(*names, prefetch=None):
            activate(*names, prefetch=prefetch)
            nonlocal max_resident
            if sum(role_bytes[n] for n in pool.resident) > sum(role_bytes[n] for n in max_resident):
                max_resident = set(pool.resident)

        pool.activate = tracked
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    trainer.backend.wrapped.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {
        "mode": mode,
        "overrides": overrides,
        "role_params": role_params,
        "role_bytes": role_bytes,
        "frozen_bytes_per_param": frozen_bytes_per_param,
        "max_resident_roles": sorted(max_resident) if pool is not None else sorted(roles),
        "step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "host_to_device_bytes_per_step": (pool.moved_bytes / steps) if pool is not None else 0,
        # the memory model's peak for the same config and shapes (the GPU run checks it: within 10 %)
        "predicted_peak_bytes": predicted_peak(cfg, trainer.dataset.latent_hw()),
    }
    if out["peak_device_bytes"]:
        out["measured_over_predicted"] = out["peak_device_bytes"] / out["predicted_peak_bytes"]
    trainer.close()
    return out


def predicted_peak(cfg, latent_hw: tuple[int, int]) -> float:
    """``python -m helios.memory``'s per-GPU peak (bytes) for this run's config on one rank."""
    from helios.commands import memory_estimate

    _, peak_gib, _ = memory_estimate.report(memory_estimate.estimate(cfg, 1, latent_hw), 1)
    return peak_gib * memory_estimate.GIB


def project(result: dict, world: int) -> dict:
    """Per-GPU weight memory for four 14B roles: the 14B bases of the roles resident at once at their
    measured frozen bytes per parameter, plus the generator's fp32 EMA sharded over ``world`` ranks
    (LoRA weights and their optimiser state, ~1-2 % of a base at rank 128, and activations excluded)."""
    per_param = result["frozen_bytes_per_param"]
    resident = sum(per_param[n] * PARAMS_14B for n in result["max_resident_roles"] if n in per_param)
    ema = 4 * PARAMS_14B / world
    return {"weights_gib": resident / 2**30, "ema_gib": ema / 2**30, "total_gib": (resident + ema) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--world", type=int, default=8, help="ranks sharing the EMA in the projection")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one mode, in a child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.smoke, args.steps)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)] + (
            ["--smoke"] if args.smoke else []
        )
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=CHECKOUT if CHECKOUT.is_dir() else None
        )
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[mode]["projected_14b"] = project(results[mode], args.world)
    base = results["resident"]
    for r in results.values():
        if r["peak_device_bytes"] and base["peak_device_bytes"]:
            r["peak_vs_resident"] = r["peak_device_bytes"] / base["peak_device_bytes"]
        r["step_time_vs_resident"] = r["step_time_s"] / base["step_time_s"]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu-smoke"
    report = {
        "device": device,
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
        "modes": results,
    }
    out = args.out or bench_results(f"stage3_memory_{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for mode, r in results.items():
        peak = f"{r['peak_device_bytes'] / 2**30:.2f} GiB" if r["peak_device_bytes"] else "n/a (CPU)"
        print(
            f"{mode:>20}: peak {peak} | step {r['step_time_s'] * 1e3:.0f} ms "
            f"(x{r['step_time_vs_resident']:.2f}) | resident at once {r['max_resident_roles']} | "
            f"projected 14B/GPU {r['projected_14b']['total_gib']:.0f} GiB"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
