"""Stop signals of a training run: SIGTERM (``scancel``, Slurm's pre-emption, torchrun's agent shutting down)
and SIGINT (Ctrl-C) ask for a checkpoint at the next step boundary, on every rank, and an exit.

Inside ``with StopSignals():`` the handlers only record the signal; the trainer reads ``received`` into the
step's one host read (a MAX over ranks), so every rank saves at the same step and exits. A second SIGINT
interrupts at once (KeyboardInterrupt). Outside the block the previous handlers are back.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def exit_status(self) -> int | None:
        """128 + the signal's number, the shell's convention for a process the signal stopped."""
        return 128 + self.signum if self.signum is not None else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: no checkpoint, stop now
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
