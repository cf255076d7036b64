"""The ``helios`` command: ``helios <command> [key=value ...]``; ``helios`` alone lists the commands."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

COMMANDS = {
    "train": ("train_helios", "train a stage (Hydra overrides: stage=1|2|3, trainer.max_steps=N, ...)"),
    "prepare": ("helios.prepare", "raw videos + captions -> latent shards"),
    "ode-pairs": ("helios.ode_pairs", "teacher samples -> ODE-pair shards for stage 3's ODE init"),
    "generate": ("helios.generate", "sample a (long) video from a checkpoint or a diffusers model"),
    "export": ("helios.export", "checkpoint -> diffusers pipeline directory or LoRA weights"),
    "tiny-vae": ("helios.tiny_vae", "train the tiny default's VAE on the moving-shapes world"),
    "memory": ("helios.memory", "per-GPU / per-node memory of a training config, no GPU or weights needed"),
    "bench": (
        None,
        "benchmarks: helios bench data | sampler | kernels | stage3-memory | toy | long-video [args]",
    ),
    "launch": (None, "launchers: helios launch slurm | torchrun | local-slurm | tiny-chain [args] | path"),
}
LAUNCHERS = {
    "slurm": "helios.sbatch",  # helios launch slurm [sbatch options] -- [overrides]
    "torchrun": "torchrun.sh",
    "local-slurm": "local_slurm.sh",
    "tiny-chain": "tiny_chain.sh",
}
BENCHES = {
    "data": "bench_data.py",
    "sampler": "bench_sampler.py",
    "kernels": "bench_kernels.py",
    "stage3-memory": "bench_stage3_memory.py",
    "toy": "toy_experiment.py",
    "long-video": "tiny_long_video.py",
}


PACKAGE = Path(__file__).resolve().parent


def bench_dir() -> Path:
    """The benchmark scripts: ``helios/bench`` in an installed wheel, ``bench/`` in a checkout."""
    installed = PACKAGE / "bench"
    return installed if installed.is_dir() else PACKAGE.parent / "bench"


def launch_dir() -> Path:
    """The launchers: ``helios/launch`` in an installed wheel, ``launch/`` in a checkout."""
    installed = PACKAGE / "launch"
    return installed if installed.is_dir() else PACKAGE.parent / "launch"


def launch_command(rest: list[str]) -> list[str] | None:
    """The command line of ``helios launch NAME [args]``: ``slurm`` submits the sbatch template (options
    before ``--`` go to sbatch, the rest to the trainer), the others run their script with bash. None for
    ``path`` (the folder is printed) or an unknown name."""
    name, args = rest[0], rest[1:]
    script = str(launch_dir() / LAUNCHERS[name])
    if name != "slurm":
        return ["bash", script, *args]
    options, overrides = (
        (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    )
    return ["sbatch", *options, script, *overrides]


def bench_results(name: str) -> Path:
    """Where a benchmark writes its JSON: ``bench/results/`` in a checkout (recorded in BENCHMARKS.md),
    ``./bench-results/`` for an installed package."""
    checkout = PACKAGE.parent / "bench" / "results"
    return (checkout if checkout.is_dir() else Path.cwd() / "bench-results") / name


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: helios <command> [key=value ...]   (each command takes --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"helios: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: helios bench {{{'|'.join(BENCHES)}}} [args]", file=sys.stderr)
            return 2
        script = bench_dir() / BENCHES[rest[0]]
        sys.argv = [str(script), *rest[1:]]
        runpy.run_path(str(script), run_name="__main__")
        return 0
    if name == "launch":
        if rest[:1] == ["path"]:
            print(launch_dir())
            return 0
        if not rest or rest[0] not in LAUNCHERS:
            print(f"usage: helios launch {{{'|'.join(LAUNCHERS)}|path}} [args]", file=sys.stderr)
            return 2
        command = launch_command(rest)
        os.execvp(command[0], command)
    module = COMMANDS[name][0]
    sys.argv = [f"helios {name}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
