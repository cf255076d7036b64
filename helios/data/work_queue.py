"""A work list that the ranks of a data job (``helios.prepare``, ``helios.ode_pairs``) claim unit by unit.

Units are claimed dynamically, not dealt out in advance, so a slow rank takes fewer and a dead one delays
nobody: a rank claims a unit by creating ``<progress>/<unit>.claim`` atomically (``O_EXCL``, also on a shared
file system), keeps the claim fresh while it works (a heartbeat thread touches it), and marks the unit done
by writing ``<progress>/<unit>.json`` (then removing the claim). A claim whose heartbeat stopped for
``stale_after_s`` (its rank died) is taken over. A rerun continues: done units are skipped, claims of the
dead are stale. No rank waits for another at the end; whoever finishes the last unit writes the report.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class WorkQueue:
    def __init__(
        self,
        progress: Path,
        units: list[str],
        rank: int = 0,
        world_size: int = 1,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.progress, self.units = Path(progress), list(units)
        self.progress.mkdir(parents=True, exist_ok=True)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank}
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        # each rank starts its search at its own place in the list: claims rarely collide
        start = len(self.units) * rank // max(world_size, 1)
        self.order = self.units[start:] + self.units[:start]

    def done_path(self, unit: str) -> Path:
        return self.progress / f"{unit}.json"

    def _claim_path(self, unit: str) -> Path:
        return self.progress / f"{unit}.claim"

    def is_done(self, unit: str) -> bool:
        return self.done_path(unit).exists()

    def remaining(self) -> list[str]:
        return [u for u in self.units if not self.is_done(u)]

    def _stale(self, claim: Path) -> bool:
        try:
            return time.time() - claim.stat().st_mtime > self.stale_after_s
        except FileNotFoundError:
            return True

    def _try_claim(self, unit: str) -> bool:
        claim = self._claim_path(unit)
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(claim):
                    return False
                claim.unlink(missing_ok=True)  # its rank died: take the unit over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            if self.is_done(unit):  # finished by another rank between our look and our claim
                claim.unlink(missing_ok=True)
                return False
            return True
        return False

    def claims(self) -> Iterator[str]:
        """The units this rank works on, one at a time, each claimed (and kept fresh) while it is yielded;
        ``finish`` marks it done."""
        for unit in self.order:
            if self.is_done(unit) or not self._try_claim(unit):
                continue
            stop = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(unit, stop), daemon=True)
            beat.start()
            try:
                yield unit
            finally:
                stop.set()
                beat.join(timeout=5)
                self._claim_path(unit).unlink(missing_ok=True)

    def _heartbeat(self, unit: str, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                os.utime(self._claim_path(unit))
            except OSError:
                return

    def finish(self, unit: str, record: dict) -> None:
        tmp = self.progress / f"{unit}.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, self.done_path(unit))

    def records(self) -> list[dict]:
        return [json.loads(self.done_path(u).read_text()) for u in self.units if self.is_done(u)]
