"""One live run per run dir: a lock file that names its holder and is kept fresh by a heartbeat.

Two runs writing into one run dir would overwrite each other's checkpoints and metrics. The main rank of a
run creates ``RUN_LOCK`` atomically (``O_EXCL``; also across nodes on a shared file system) and touches it
every ``HEARTBEAT_S`` seconds. A second run is refused, naming the holder, unless the lock is stale: its
holder ran on this host and is gone, it belongs to the same launch (a requeued Slurm job or a restarted
torchrun rendezvous on another node), or its heartbeat is older than ``STALE_AFTER_S`` (a holder that died
on another node).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK = "RUN_LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirBusy(OSError):
    """Another live run holds the run dir."""


def launch_id(env: dict[str, str]) -> str | None:
    """What every process of one launch (and its restarts) shares: the torchrun rendezvous id, else the
    Slurm job id (kept by a requeued job)."""
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``acquire`` / ``release`` the run dir (main rank only); ``holder`` describes this process."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "launch": launch_id(dict(os.environ)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def stale_reason(self, holder: dict) -> str | None:
        """Why the lock ``holder`` wrote may be taken over (None: its run is alive)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        me = self.holder
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid):
            return f"its process {holder['pid']} on this host has ended"
        if holder.get("launch") and holder["launch"] == me["launch"] and holder.get("host") != me["host"]:
            return f"it belongs to this launch ({me['launch']}), restarted on {me['host']}"
        if age > self.stale_after_s:
            return f"its last heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunDirBusy(self._busy(holder)) from None
                self.path.unlink(missing_ok=True)  # stale: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="helios-run-lock", daemon=True)
            self._beat.start()
            return
        raise RunDirBusy(self._busy(self._read()))

    def _busy(self, holder: dict) -> str:
        who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "launch", "started") if holder.get(k))
        return (
            f"run dir {self.path.parent} is in use by another live run ({who or 'unknown holder'}): two runs "
            "in one run dir would overwrite each other's checkpoints. Choose another hydra.run.dir, or stop "
            f"that run; the lock of a run that died goes stale {self.stale_after_s:.0f} s after its last "
            f"heartbeat (or remove {self.path} once no run uses the folder)"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
            if self._read().get("pid") == self.holder["pid"]:
                self.path.unlink(missing_ok=True)
