"""Scenario 1: workers SIGKILLed again and again while thousands of short jobs drain, a
replacement started each time. Nothing accepted is lost; every duplicate execution ran first in
a killed process (its outcome died with it), and the lease brought the job back."""

from __future__ import annotations

import time

from backroom.envelope import State
from tests.faults.conftest import Rig, duplicates_explained

JOBS = 5000
KILL_EVERY_S = 0.5
LEASE_S = "2"
WORKERS = 3


def test_scenario_1_sigkill_a_worker_every_half_second_while_5000_jobs_drain(
    rig: Rig, report: list[str]
) -> None:
    handles = rig.app.enqueue_many("record", [{"n": n} for n in range(JOBS)])
    args = ("--concurrency", "4", "--lease", LEASE_S)
    live = [rig.worker(*args) for _ in range(WORKERS)]
    started = time.monotonic()
    kills = 0
    while rig.app.broker.stats().queues.get("default", 0) > 0:
        time.sleep(KILL_EVERY_S)  # the fault's cadence, not a wait for a result
        serving = {w.pid for w in rig.app.broker.workers()}
        victims = [proc for proc in live if proc.pid in serving]  # oldest first
        if victims:  # kill one that serves (registered), so each kill can interrupt work
            live.remove(victims[0])
            rig.kill(victims[0])
            kills += 1
            live.append(rig.worker(*args))
        assert time.monotonic() - started < 120, "the jobs never drained"
    records = rig.settle(handles, deadline_s=60)
    drained_s = time.monotonic() - started

    states = {str(r.state) for r in records}
    assert states <= {"succeeded", "dead"}, states
    for record in records:  # dead only if killed mid-run on every one of its 4 attempts
        if record.state == State.DEAD:
            assert record.error is not None and record.error.type == "LeaseExpired"
    runs = rig.executions("record")
    ran = {run.n for run in runs}
    succeeded = [r for r in records if r.state == State.SUCCEEDED]
    assert all(r.result == r.envelope.payload["n"] for r in succeeded)
    assert {r.envelope.payload["n"] for r in succeeded} <= ran, "a job succeeded without running"
    duplicates, unexplained = duplicates_explained(runs, rig.killed)
    assert not unexplained, unexplained
    stats = rig.app.broker.stats().jobs["record"]
    report.append(
        f"{JOBS} jobs, {kills} SIGKILLs every ~{KILL_EVERY_S} s (lease {LEASE_S} s): "
        f"{len(succeeded)} succeeded, {len(records) - len(succeeded)} dead, 0 lost; "
        f"{duplicates} duplicate executions, each by a killed worker; "
        f"{stats.recoveries} lease recoveries; drained in {drained_s:.1f} s"
    )
