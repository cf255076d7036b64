"""The data jobs' work list: units claimed one at a time, a dead rank's claim taken over, none done twice."""

import json
import os
import time

from helios.data.work_queue import WorkQueue


def test_two_ranks_claim_disjoint_units_and_finish_them_all(tmp_path):
    units = [f"u{i}" for i in range(7)]
    a, b = WorkQueue(tmp_path, units, 0, 2), WorkQueue(tmp_path, units, 1, 2)
    ia, ib = a.claims(), b.claims()
    done = []
    while True:  # the two ranks alternate, as two processes would interleave
        progressed = False
        for queue, it in ((a, ia), (b, ib)):
            unit = next(it, None)
            if unit is not None:
                queue.finish(unit, {"unit": unit})
                done.append(unit)
                progressed = True
        if not progressed:
            break
    assert sorted(done) == units and a.remaining() == [] and len(a.records()) == 7
    assert not list(tmp_path.glob("*.claim"))


def test_a_live_claim_is_left_alone_and_a_dead_ranks_claim_is_taken_over(tmp_path):
    units = ["u0", "u1", "u2"]
    (tmp_path / "u0.claim").write_text(json.dumps({"rank": 5}))  # a live rank works on u0
    (tmp_path / "u1.claim").write_text(json.dumps({"rank": 6}))  # a rank that died on u1
    old = time.time() - 3600
    os.utime(tmp_path / "u1.claim", (old, old))
    queue = WorkQueue(tmp_path, units, stale_after_s=600)
    taken = []
    for unit in queue.claims():
        queue.finish(unit, {})
        taken.append(unit)
    assert taken == ["u1", "u2"] and queue.remaining() == ["u0"]  # nobody waits for u0's rank


def test_a_claim_is_kept_fresh_while_its_unit_is_worked_on(tmp_path):
    queue = WorkQueue(tmp_path, ["u0"], heartbeat_s=0.05, stale_after_s=0.5)
    for unit in queue.claims():
        time.sleep(1.0)  # longer than the stale limit: the heartbeat keeps the claim alive
        other = WorkQueue(tmp_path, ["u0"], stale_after_s=0.5)
        assert list(other.claims()) == []
        queue.finish(unit, {})
    assert queue.remaining() == []
