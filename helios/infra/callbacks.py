"""Step-end hooks of the training loop (validation, metrics files, trackers): the loop asks each whether it
is due before a step, so a step nobody reads never reads its metrics from the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCallback:
    """``run(step, metrics)`` after the steps ``due(step, last_step)`` names; ``on_logged``: also after every
    step whose metrics another callback asked for (a logger writes what validation added)."""

    due: Callable[[int, int], bool]
    run: Callable[[int, dict[str, float]], None]
    on_logged: bool = False


def every(n: int) -> Callable[[int, int], bool]:
    """Due every ``n`` steps (0: never) and at the last step."""
    return lambda step, last: bool(n and step % n == 0) or step == last
