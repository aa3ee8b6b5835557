"""Scenario 4: jobs that never return. Past its timeout a job fails with a timeout error and is
retried per its policy; its child (which cannot kill a thread) is replaced, or killed by the
supervisor when the job froze it. Running jobs that are cancelled end `cancelled`: in place when
they cooperate, by replacing their child when they ignore the cancel past --cancel-grace."""

from __future__ import annotations

from pathlib import Path

from backroom.envelope import State
from tests.faults.conftest import Rig, duplicates_explained


def test_scenario_4a_a_job_that_never_returns_fails_at_its_timeout_and_the_worker_serves_on(
    rig: Rig, report: list[str]
) -> None:
    spinning = rig.app.enqueue("spin", {"n": 0})  # timeout=2, retries=1
    others = rig.app.enqueue_many("record", [{"n": n} for n in range(1, 11)])
    supervisor = rig.worker("--processes", "1", "--concurrency", "2", supervised=True)
    spun, *rest = rig.settle([spinning, *others])
    assert (spun.state, spun.attempts) == (State.DEAD, 2)
    assert spun.error is not None
    assert (spun.error.type, spun.error.message) == (
        "JobTimeout",
        "job exceeded its timeout of 2 s",
    )
    assert [r.state for r in rest] == [State.SUCCEEDED] * 10
    assert sorted(run.n for run in rig.executions("record")) == list(range(1, 11))
    pids = {run.pid for run in rig.executions("spin")}
    assert len(pids) == 2  # each stuck attempt got its child replaced
    assert rig.app.enqueue("whoami", {"n": 99}).result(timeout=60) not in pids
    assert supervisor.poll() is None
    report.append(
        "`while True: pass` with timeout=2: JobTimeout on both attempts (dead), "
        "2 children replaced; 10 other jobs ran exactly once"
    )


def test_scenario_4b_a_job_that_holds_the_gil_past_its_timeout_gets_its_child_killed(
    rig: Rig, report: list[str]
) -> None:
    frozen = rig.app.enqueue("hold_the_gil", {"n": 0})  # timeout=1, retries=0
    others = rig.app.enqueue_many("record", [{"n": n} for n in range(1, 11)])
    # A claim committed while the frozen job held the GIL never reaches the supervisor's
    # pipe; only its lease brings that job back, so keep the lease short here.
    supervisor = rig.worker(
        "--processes", "1", "--concurrency", "2", "--lease", "3", supervised=True
    )
    held, *rest = rig.settle([frozen, *others])
    assert (held.state, held.attempts) == (State.DEAD, 1)
    assert held.error is not None and held.error.type == "JobTimeout"
    assert "froze its worker process" in held.error.message
    assert [r.state for r in rest] == [State.SUCCEEDED] * 10
    [victim] = {run.pid for run in rig.executions("hold_the_gil")}
    # a job caught in the same child was handed back and ran again: the kill explains it
    duplicates, unexplained = duplicates_explained(rig.executions("record"), {victim})
    assert not unexplained, unexplained
    assert rig.app.enqueue("whoami", {"n": 99}).result(timeout=60) != victim
    assert supervisor.poll() is None
    report.append(
        f"a C call holding the GIL past timeout=1: its child was killed by the "
        f"supervisor, the job dead with JobTimeout; {duplicates} bystander "
        f"re-execution(s), each from the killed child"
    )


def test_cancelled_running_jobs_stop_in_place_or_their_child_is_replaced(
    rig: Rig, tmp_path: Path, report: list[str]
) -> None:
    never = str(tmp_path / "never")
    cooperative = rig.app.enqueue("wait_for_file", {"n": 0, "path": never})
    awaiting = rig.app.enqueue("async_wait_for_file", {"n": 1, "path": never})
    supervisor = rig.worker(
        "--processes", "1", "--concurrency", "3", "--cancel-grace", "0.5", supervised=True
    )
    [first, _] = rig.started("wait_for_file") + rig.started("async_wait_for_file")
    assert cooperative.cancel() and awaiting.cancel()
    records = rig.settle([cooperative, awaiting])
    assert [(r.state, r.reason) for r in records] == [(State.CANCELLED, "cancelled by api")] * 2
    assert rig.app.enqueue("whoami", {"n": 2}).result(timeout=60) == first.pid  # same child

    stubborn = rig.app.enqueue("ignore_cancel", {"n": 3, "path": never})
    [run] = rig.started("ignore_cancel")
    assert stubborn.cancel()
    [record] = rig.settle([stubborn])
    assert (record.state, record.reason) == (State.CANCELLED, "cancelled by api")
    assert rig.app.enqueue("whoami", {"n": 4}).result(timeout=60) != run.pid  # replaced
    assert len(rig.executions("ignore_cancel")) == 1  # and never run again
    assert supervisor.poll() is None
    report.append(
        "cancelled while running: a sync job (ctx.cancelled) and an async job "
        "(task cancellation) ended `cancelled` in place; one ignoring the cancel "
        "past --cancel-grace 0.5 ended `cancelled` and its child was replaced"
    )
