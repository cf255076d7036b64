"""The 14B memory table (docs/scale-out.md) from ``python -m helios.memory``'s model: every recipe row's
peak per phase at world size 8 and 64 (8 GPUs per node, 384x640, each phase's own batch).

    python bench/memory_table.py            # markdown rows
    python bench/memory_table.py --json F   # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import json

from helios.commands import memory_estimate
from helios.config import compose

COMMON = ["model=wan14b", "model.transformer.path=/x", "data=/d", "distill.teacher=/x"]
ROWS = [  # (phase, overrides beyond the recipe row's, description)
    ("1-init", ["stage=1", "stage1=init"], "—"),
    ("1-post", ["stage=1", "stage1=post", "init_from=/x"], "—"),
    ("2-init", ["stage=2", "stage2=init", "init_from=/x"], "—"),
    ("2-post", ["stage=2", "stage2=post", "init_from=/x"], "—"),
    ("3-ode", ["stage=3", "stage3=ode", "init_from=/x"], "—"),
    ("3-post", ["stage=3", "stage3=post", "init_from=/x", "distill.offload=true",
                "model.transformer.checkpoint_offload=true"],
     "`distill.offload=true model.transformer.checkpoint_offload=true` (the paper's layout)"),
    ("3-post", ["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "distill.offload=true"],
     "`parallel=zero2 distill.offload=true` (the reference's layout)"),
    ("3-post", ["stage=3", "stage3=post", "init_from=/x", "parallel=zero2", "parallel.roles.critic=zero3"],
     "`parallel=zero2 parallel.roles.critic=zero3`"),
    ("3-post", ["stage=3", "stage3=post", "init_from=/x", "parallel=zero3"], "`parallel=zero3`"),
    ("3-post", ["stage=3", "stage3=post", "init_from=/x", "parallel=zero3",
                "parallel.zero_hpz_partition_size=8"],
     "`parallel=zero3 parallel.zero_hpz_partition_size=8` (all-gathers inside the node)"),
]  # fmt: skip
SHORT = {"build": "build", "prompts": "prompts", "step": "step", "validation": "val", "checkpoint": "save",
         "resume": "resume"}  # fmt: skip


def row(overrides: list[str], world: int) -> memory_estimate.Peaks:
    cfg = compose([*overrides, *COMMON])
    return memory_estimate.phase_peaks(memory_estimate.estimate(cfg, world, (48, 80)), 8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    out = []
    print("| phase | overrides | world | GiB per GPU: " + " / ".join(SHORT[p] for p in memory_estimate.PHASES)
          + " | **peak** | host GiB per node: build / step / val / save / resume | **peak** |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for phase, overrides, label in ROWS:
        for world in (8, 64):
            peaks = row(overrides, world)
            gpu = " / ".join(
                f"{peaks.phases[p][0]:.1f}" if p in peaks.phases else "—" for p in memory_estimate.PHASES
            )
            host = " / ".join(
                f"{peaks.phases[p][1]:.0f}" for p in ("build", "step", "validation", "checkpoint", "resume")
            )
            peak = f"**{peaks.gpu:.1f}** | {host} | **{peaks.host:.0f}**"
            print(f"| {phase} | {label} | {world} | {gpu} | {peak} |")
            out.append({"phase": phase, "overrides": overrides, "world": world, "phases": peaks.phases})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
