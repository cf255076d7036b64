"""One live run per run dir: the lock, its holder, and when a lock is stale."""

import json
import os
import subprocess
import sys
import time

import pytest

from helios.infra.run_lock import LOCK, RunDirBusy, RunLock


def _holder(tmp_path, **fields) -> None:
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "launch": None, **fields}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_and_named(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by another live run \(host \S+, pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).acquire()  # free again


def test_a_holder_that_died_on_this_host_is_stale(tmp_path):
    lock = RunLock(tmp_path)
    _holder(tmp_path, host=lock.holder["host"], pid=_dead_pid())
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_holder_on_another_host_is_alive_until_its_heartbeat_stops(tmp_path):
    _holder(tmp_path, host="node7", pid=4242)
    with pytest.raises(RunDirBusy, match="host node7, pid 4242"):
        RunLock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK, (old, old))  # no heartbeat for 10 minutes: that node's run died
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_the_same_launch_restarted_on_another_node_takes_the_lock_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # a requeued job keeps its id
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _holder(tmp_path, host="node7", pid=4242, launch="slurm-777")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    _holder(tmp_path, host="node7", pid=4242, launch="slurm-778")  # another job
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path).acquire()


def test_the_heartbeat_keeps_a_long_step_alive(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05, stale_after_s=0.5)
    lock.acquire()
    try:
        time.sleep(1.0)  # longer than the stale limit, but the heartbeat touched the file meanwhile
        other = RunLock(tmp_path, stale_after_s=0.5)
        other.holder["host"] = "another-node"  # not judged by its pid
        with pytest.raises(RunDirBusy):
            other.acquire()
    finally:
        lock.release()
