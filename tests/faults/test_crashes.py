"""Scenario 3: jobs that take their process down (os._exit, a segfault) or leak memory past
--max-memory-per-child. Each takes down at most its own child; the supervisor replaces it, and
the replacement fails the job at once with the reason (no lease wait), retried per its policy."""

from __future__ import annotations

from backroom.envelope import State
from tests.faults.conftest import Rig


def test_scenario_3a_jobs_that_exit_or_segfault_take_down_only_their_child(
    rig: Rig, report: list[str]
) -> None:
    exits = rig.app.enqueue("exit_hard", {"n": 0})
    crashes = rig.app.enqueue("segfault", {"n": 1})
    bystanders = rig.app.enqueue_many("record", [{"n": n} for n in range(10, 30)])
    # concurrency 1: a crashing job shares its process with no other job
    supervisor = rig.worker("--processes", "2", "--concurrency", "1", supervised=True)
    exited, crashed, *others = rig.settle([exits, crashes, *bystanders])

    for record, reason in (
        (exited, "exited with code 1"),
        (crashed, "died from signal 11 (SIGSEGV)"),
    ):
        assert (record.state, record.attempts) == (State.DEAD, 2)  # retries=1: both attempts
        assert record.error is not None and record.error.type == "WorkerCrashed"
        assert record.error.message.endswith(reason), record.error.message
    for job in ("exit_hard", "segfault"):
        pids = [run.pid for run in rig.executions(job)]
        assert len(pids) == len(set(pids)) == 2  # each attempt took down a different child
    assert [r.state for r in others] == [State.SUCCEEDED] * 20
    assert sorted(run.n for run in rig.executions("record")) == list(range(10, 30))  # once each
    # failed by the replacement child at once: no job waited for its lease (60 s) to expire
    assert rig.app.broker.stats().jobs["exit_hard"].recoveries == 0
    assert supervisor.poll() is None  # the worker itself never went down
    assert rig.app.enqueue("whoami", {"n": 99}).result(timeout=60) not in pids
    supervisor.terminate()
    assert supervisor.wait(timeout=60) == 0
    report.append(
        "os._exit(1) and SIGSEGV each killed 2 children (1 retry each): both jobs "
        "dead with WorkerCrashed and the exit reason, failed at once by the "
        "replacement child (0 lease recoveries); 20 bystanders ran exactly once"
    )


def test_scenario_3b_a_child_past_max_memory_is_replaced_after_its_job(
    rig: Rig, report: list[str]
) -> None:
    supervisor = rig.worker(
        "--processes", "1", "--concurrency", "1", "--max-memory-per-child", "150", supervised=True
    )
    leaked_in = rig.app.enqueue("hog_memory", {"n": 0, "mb": 200}).result(timeout=60)
    after = rig.app.enqueue_many("whoami", [{"n": n} for n in range(1, 4)])
    pids = {h.result(timeout=60) for h in after}
    assert leaked_in not in pids  # the job finished, then its child was replaced
    assert supervisor.poll() is None
    report.append(
        "a job leaking 200 MB finished; its child (limit 150 MB) was replaced "
        "before it took another job"
    )


def test_recycling_max_jobs_per_child_replaces_each_child_after_that_many_jobs(
    rig: Rig, report: list[str]
) -> None:
    handles = rig.app.enqueue_many("whoami", [{"n": n} for n in range(20)])
    rig.worker(
        "--processes",
        "1",
        "--concurrency",
        "2",
        "--max-jobs-per-child",
        "5",
        "--burst",
        supervised=True,
    )
    records = rig.settle(handles)
    per_pid: dict[int, int] = {}
    for record in records:
        assert record.state == State.SUCCEEDED
        per_pid[record.result] = per_pid.get(record.result, 0) + 1
    assert sorted(per_pid.values()) == [5, 5, 5, 5]
    report.append(f"20 jobs with --max-jobs-per-child 5 ran in {len(per_pid)} children")
