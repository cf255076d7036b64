"""``python -m helios.memory [training overrides] world_size=N``: a training config's memory per GPU and
per node, counted without weights or a GPU.

Entry point only (it imports nothing heavy before the config is valid): the memory model and its
documentation are in ``helios/commands/memory_estimate.py``.
"""

from __future__ import annotations

import sys

from helios.config import ConfigError, compose
from helios.config.entry import USER_ERRORS, implementation

USAGE = """usage: python -m helios.memory [training overrides ...] [world_size=N] [gpus_per_node=8]
                                  [height=384] [width=640]

The same overrides as train_helios.py (stage=, stage1=, model=, parallel=, distill.offload=, ...);
world_size: ranks the run uses (default 8); height/width: the training resolution in pixels.
Prints every memory category per GPU and per node's host memory; the last line is
peak_gib_per_gpu=<x> host_gib_per_node=<y>."""


def _positive(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(key, f"is {value!r}, not a whole number") from None
    if number < 1:
        raise ConfigError(key, f"is {number}, must be >= 1")
    return number


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    own = {"world_size": 8, "gpus_per_node": 8, "height": 384, "width": 640}
    overrides = []
    try:
        for arg in argv:
            key, _, value = arg.partition("=")
            if key in own:
                own[key] = _positive(key, value)
            else:
                overrides.append(arg)
        cfg = compose(overrides)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    implementation("helios.commands.memory_estimate:print_report")(cfg, **own)
    return 0


if __name__ == "__main__":
    sys.exit(main())
