"""Scenario 2: SIGTERM during long jobs. The worker stops reserving; running jobs finish within
the grace period or are handed back to the queue at once (never left `running` until a lease
expires) and completed by the next worker; a second signal hands everything back at once."""

from __future__ import annotations

from pathlib import Path

from backroom.envelope import State
from tests.faults.conftest import Rig


def test_scenario_2a_sigterm_lets_long_jobs_finish_and_a_second_sigterm_hands_back_the_rest(
    rig: Rig, tmp_path: Path, report: list[str]
) -> None:
    finishing, hanging = tmp_path / "finish", tmp_path / "hang"
    soon = rig.app.enqueue_many(
        "wait_for_file", [{"n": n, "path": str(finishing)} for n in range(4)]
    )
    later = rig.app.enqueue_many(
        "wait_for_file", [{"n": n, "path": str(hanging)} for n in range(4, 8)]
    )
    supervisor = rig.worker(
        "--processes", "2", "--concurrency", "4", "--grace", "600", supervised=True
    )
    rig.started("wait_for_file", count=8)
    supervisor.terminate()
    rig.logged("stopping: waiting up to 600 s", count=2)  # both children stopped reserving
    extra = rig.app.enqueue("record", {"n": 100})  # arrives during the stop: not reserved
    finishing.touch()
    rig.settle(soon)
    assert [h.status() for h in later] == ["running"] * 4  # still within the grace period
    supervisor.terminate()  # the second signal: stop at once
    assert supervisor.wait(timeout=60) == 0
    handed_back = rig.records(later)
    assert [(r.state, r.attempts) for r in handed_back] == [(State.QUEUED, 0)] * 4
    assert extra.status() == "queued"

    hanging.touch()
    assert rig.worker("--burst").wait(timeout=60) == 0
    records = rig.settle([*soon, *later, extra])
    assert [(r.state, r.attempts) for r in records] == [(State.SUCCEEDED, 1)] * 9
    runs = rig.executions("wait_for_file")
    per_job = {n: sum(1 for r in runs if r.n == n) for n in range(8)}
    assert per_job == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}
    report.append(
        "4 jobs finished within the grace period; 4 handed back at the second "
        "SIGTERM (queued at once, attempt uncounted) and completed by the next "
        "worker: 4 re-executions, each explained by the hand-back"
    )


def test_scenario_2b_jobs_still_running_after_the_grace_period_are_handed_back_at_once(
    rig: Rig, tmp_path: Path, report: list[str]
) -> None:
    gate = tmp_path / "gate"
    handles = rig.app.enqueue_many("wait_for_file", [{"n": n, "path": str(gate)} for n in range(3)])
    sync = rig.app.enqueue("async_wait_for_file", {"n": 3, "path": str(gate)})
    worker = rig.worker("--concurrency", "4", "--grace", "0.5", "--lease", "600")
    rig.started("wait_for_file", count=3)
    rig.started("async_wait_for_file")
    worker.terminate()
    assert worker.wait(timeout=60) == 0
    # queued again at once, though their lease had 10 minutes to run
    records = rig.records([*handles, sync])
    assert [(r.state, r.attempts) for r in records] == [(State.QUEUED, 0)] * 4
    gate.touch()
    assert rig.worker("--burst").wait(timeout=60) == 0
    records = rig.settle([*handles, sync])
    assert [r.state for r in records] == [State.SUCCEEDED] * 4
    report.append(
        "4 jobs (3 sync, 1 async) outlived a 0.5 s grace period: queued again at "
        "once despite a 600 s lease, then completed by the next worker"
    )
