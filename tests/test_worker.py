"""The worker in-process, on every broker (memory, sqlite, redis): timeouts, cancellation of running
jobs, graceful stop, the worker registry, recycling limits, and how a child settles the jobs
its crashed predecessor held. Real processes are in tests/faults/."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

import backroom
import backroom.worker
from backroom.brokers.base import WorkerInfo
from backroom.brokers.redis import RedisBroker
from backroom.supervisor import ORPHANS_ENV, ChildChannel, _Child
from backroom.worker import EXIT_RECYCLE, Worker
from tests.conftest import BACKENDS
from tests.helpers import wait_until


class Gates:
    """Events the jobs of one test wait on, opened at the end so no thread outlives the test."""

    def __init__(self) -> None:
        self.events: dict[str, threading.Event] = {}

    def __getitem__(self, name: str) -> threading.Event:
        return self.events.setdefault(name, threading.Event())

    def open_all(self) -> None:
        for event in self.events.values():
            event.set()


@pytest.fixture(params=BACKENDS)
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[backroom.App]:
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'app.db'}"}.get(request.param)
    application = backroom.App(url or request.getfixturevalue("redis_server"), source="api")
    application.broker.purge()  # the session's redis is shared by this process's tests
    gates = Gates()
    seen: dict[str, Any] = {"ran": [], "async_cancelled": 0}

    @application.job(retries=0, timeout=0.3)
    def stuck(ctx: backroom.Context, gate: str) -> None:
        gates[gate].wait(30)

    @application.job(retries=0)
    def stuck_without_timeout(ctx: backroom.Context, gate: str) -> None:
        seen.setdefault("entered", []).append(gate)
        gates[gate].wait(30)

    @application.job(retries=0, timeout=0.3)
    async def slow_async(ctx: backroom.Context) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["async_cancelled"] += 1
            raise

    @application.job(retries=0)
    def cooperative(ctx: backroom.Context, gate: str) -> str:
        gates[f"{gate}-started"].set()
        while not ctx.cancelled and not gates[gate].is_set():
            time.sleep(0.005)  # a job doing its work in small steps
        return "stopped early" if ctx.cancelled else "finished"

    @application.job(retries=0)
    async def async_waits(ctx: backroom.Context, gate: str) -> str:
        gates[f"{gate}-started"].set()
        try:
            while not gates[gate].is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            seen["async_cancelled"] += 1
            raise
        return "finished"

    @application.job(retries=0)
    def remember(ctx: backroom.Context, n: int) -> int:
        seen["ran"].append(n)
        return n

    @application.job(retries=3)
    def patient(ctx: backroom.Context, n: int) -> int:
        return n

    application.gates = gates  # type: ignore[attr-defined]
    application.seen = seen  # type: ignore[attr-defined]
    yield application
    gates.open_all()
    application.close()


@contextmanager
def serving(app: backroom.App, **options: Any) -> Iterator[Worker]:
    """A worker running in a thread for the duration of the block, stopped at once after."""
    options.setdefault("lease", 0.6)  # heartbeats (and cancel checks) every 0.2 s
    options.setdefault("cancel_grace", 5.0)
    worker = Worker(app, **options)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop(immediately=True)
        thread.join(20)
        assert not thread.is_alive(), "the worker did not stop"


def final(handle: backroom.Handle, deadline_s: float = 20) -> dict[str, Any]:
    wait_until(
        lambda: handle.info()["state"] in {"succeeded", "dead", "cancelled", "rejected"},
        deadline_s=deadline_s,
        what=f"job {handle.id} to finish",
    )
    return handle.info()


# -- timeouts --------------------------------------------------------------------------------


def test_a_sync_job_past_its_timeout_fails_with_a_timeout_error_and_the_worker_keeps_serving(
    app: backroom.App,
) -> None:
    stuck = app.enqueue("stuck", {"gate": "never"})
    after = app.enqueue_many("remember", [{"n": n} for n in range(3)])
    assert app.run_worker(burst=True, concurrency=1) == 0
    info = stuck.info()
    assert info["state"] == "dead"
    assert info["error"]["type"] == "JobTimeout"
    assert info["error"]["message"] == "job exceeded its timeout of 0.3 s"
    assert "JobTimeout: job exceeded its timeout" in info["error"]["traceback"]
    # the stuck thread kept its slot, yet the single-slot worker ran the rest
    assert [h.status() for h in after] == ["succeeded"] * 3


def test_a_job_written_off_on_the_thread_that_fetched_it_leaves_the_worker_at_full_strength(
    app: backroom.App,
) -> None:
    back = threading.Event()

    @app.job(retries=0, timeout=0.3)
    def stuck_then_back() -> None:
        app.gates["late"].wait(30)  # type: ignore[attr-defined]
        back.set()

    # an idle worker runs the first job it gets on the thread that waited for it
    with serving(app, concurrency=2) as worker:
        assert final(app.enqueue("remember", {"n": -1}))["state"] == "succeeded"
        wait_until(lambda: worker._watcher and not (worker._running or worker._loop_claiming),
                   deadline_s=20, what="the worker to wait idle")  # fmt: skip
        stuck = app.enqueue("stuck_then_back")
        assert final(stuck)["error"]["type"] == "JobTimeout"
        app.gates["late"].set()  # type: ignore[attr-defined]
        assert back.wait(20)  # the written-off job's thread is back
        for round_ in range(3):  # both slots, on a job thread and on the waiter's
            handles = app.enqueue_many("remember", [{"n": round_ * 2 + i} for i in range(2)])
            assert [final(h)["state"] for h in handles] == ["succeeded"] * 2
        # every slot is free again, none twice
        wait_until(lambda: worker._free == 2 and not worker._running, deadline_s=20,
                   what="the worker to be idle")  # fmt: skip
        assert worker._free == 2


def test_jobs_that_come_one_at_a_time_run_without_the_worker_gaining_threads(
    app: backroom.App,
) -> None:
    with serving(app, concurrency=2):
        assert final(app.enqueue("remember", {"n": 0}))["state"] == "succeeded"
        threads = threading.active_count()
        for n in range(1, 25):
            assert final(app.enqueue("remember", {"n": n}))["state"] == "succeeded"
        # the thread that ran the job it fetched went back to waiting. Bounded by: one more
        # starting a wait as this counts, and the job threads (as many as the concurrency),
        # which start once the loop claims a job itself
        assert threading.active_count() <= threads + 1 + 2


def test_an_async_job_past_its_timeout_is_cancelled_and_fails_with_a_timeout_error(
    app: backroom.App,
) -> None:
    handle = app.enqueue("slow_async")
    app.run_worker(burst=True)
    info = handle.info()
    assert (info["state"], info["error"]["type"]) == ("dead", "JobTimeout")
    assert app.seen["async_cancelled"] == 1  # type: ignore[attr-defined]


def test_the_worker_default_timeout_applies_to_jobs_that_set_none(app: backroom.App) -> None:
    handle = app.enqueue("stuck_without_timeout", {"gate": "never"})
    app.run_worker(burst=True, timeout=0.2)
    info = handle.info()
    assert (info["state"], info["error"]["message"]) == (
        "dead",
        "job exceeded its timeout of 0.2 s",
    )


def test_a_worker_timeout_must_be_positive(app: backroom.App) -> None:
    with pytest.raises(
        backroom.BackroomError,
        match=r"timeout must be a positive number of "
        r"seconds, got 0",
    ):
        Worker(app, timeout=0)


# -- cancellation ----------------------------------------------------------------------------


def test_a_cancelled_sync_job_sees_ctx_cancelled_and_ends_cancelled(app: backroom.App) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("cooperative", {"gate": "g"})
    with serving(app):
        assert gates["g-started"].wait(20)
        assert handle.cancel() is True
        info = final(handle)
    assert (info["state"], info["reason"]) == ("cancelled", "cancelled by api")
    assert info["result"] is None  # it returned "stopped early"; a cancelled job keeps no result


def test_a_cancelled_async_job_gets_task_cancellation_and_ends_cancelled(
    app: backroom.App,
) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("async_waits", {"gate": "g"})
    with serving(app):
        assert gates["g-started"].wait(20)
        handle.cancel()
        info = final(handle)
    assert (info["state"], info["reason"]) == ("cancelled", "cancelled by api")
    assert app.seen["async_cancelled"] == 1  # type: ignore[attr-defined]


def test_a_job_that_ignores_its_cancel_is_stopped_after_the_cancel_grace_and_ends_cancelled(
    app: backroom.App,
) -> None:
    handle = app.enqueue("stuck_without_timeout", {"gate": "never"})
    with serving(app, cancel_grace=0.2, concurrency=1) as worker:
        wait_until(lambda: handle.status() == "running", deadline_s=20, what="the job to start")
        handle.cancel()
        info = final(handle)
        assert (info["state"], info["reason"]) == ("cancelled", "cancelled by api")
        # in-process, its thread is written off; the worker's one slot serves on
        after = app.enqueue("remember", {"n": 1})
        assert after.result(timeout=20) == 1
        assert worker._abandoned == 1


def test_cancelled_queued_and_scheduled_jobs_never_run(app: backroom.App) -> None:
    queued = app.enqueue("remember", {"n": 1})
    scheduled = app.enqueue("remember", {"n": 2}, delay=0.2)
    kept = app.enqueue("remember", {"n": 3}, delay=0.2)
    assert queued.cancel() and scheduled.cancel()
    assert queued.status() == scheduled.status() == "cancelled"
    with serving(app):
        assert kept.result(timeout=20) == 3
    assert app.seen["ran"] == [3]  # type: ignore[attr-defined]
    assert queued.cancel() is False  # already final


# -- graceful stop ---------------------------------------------------------------------------


def test_stop_lets_running_jobs_finish_within_the_grace_period(app: backroom.App) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("cooperative", {"gate": "g"})
    worker = Worker(app, grace=30)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert gates["g-started"].wait(20)
    queued_later = app.enqueue("remember", {"n": 1})
    worker.stop()
    gates["g"].set()
    thread.join(20)
    assert handle.info()["state"] == "succeeded" and handle.result() == "finished"
    assert queued_later.status() == "queued"  # it stopped reserving


def test_stop_hands_unfinished_jobs_back_at_once_after_the_grace_period(
    app: backroom.App,
) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("async_waits", {"gate": "g"})
    worker = Worker(app, grace=0.2, lease=60)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert gates["g-started"].wait(20)
    worker.stop()
    thread.join(20)
    info = handle.info()
    assert (info["state"], info["attempts"]) == ("queued", 0)  # not after a 60 s lease
    gates["g"].set()
    app.run_worker(burst=True)
    assert (handle.status(), handle.info()["attempts"]) == ("succeeded", 1)


def test_a_second_stop_hands_running_jobs_back_at_once(app: backroom.App) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("cooperative", {"gate": "g"})
    worker = Worker(app, grace=3600)
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert gates["g-started"].wait(20)
    worker.stop()
    worker.stop()
    thread.join(20)
    assert not thread.is_alive()
    assert handle.status() == "queued"
    gates["g"].set()


# -- the worker registry ---------------------------------------------------------------------


def test_a_worker_registers_with_its_host_pid_queues_and_current_jobs(app: backroom.App) -> None:
    gates: Gates = app.gates  # type: ignore[attr-defined]
    handle = app.enqueue("cooperative", {"gate": "g"})
    with serving(app, queues=["default"], concurrency=3) as worker:
        assert gates["g-started"].wait(20)
        [info] = app.broker.workers()
        assert (info.id, info.pid, info.queues, info.concurrency) == (
            worker.id,
            os.getpid(),
            ("default",),
            3,
        )
        assert info.host and info.seen_at >= info.started_at
        wait_until(
            lambda: app.broker.workers()[0].current == (handle.id,),
            deadline_s=20,
            what="the heartbeat to list the running job",
        )
        gates["g"].set()
    assert app.broker.workers() == []  # a worker that stops unregisters


def test_a_vanished_worker_disappears_once_its_heartbeat_expires(app: backroom.App) -> None:
    from backroom.worker import WORKER_TTL_S

    now = time.time()
    info = WorkerInfo(
        id="gone:1",
        host="gone",
        pid=1,
        queues=("default",),
        concurrency=1,
        started_at=now,
        seen_at=now,
        current=("job-1",),
    )
    app.broker.register_worker(info, WORKER_TTL_S)  # and then it was killed: never again
    assert [w.id for w in app.broker.workers(now=now + WORKER_TTL_S - 1)] == ["gone:1"]
    assert app.broker.workers(now=now + WORKER_TTL_S + 1) == []


def test_bytes_that_are_not_an_envelope_are_rejected_and_the_reject_hooks_hear_of_it(
    app: backroom.App,
) -> None:
    from unittest import mock

    from backroom.envelope import Envelope, new_id

    heard: list[tuple[str, str]] = []
    app.on_reject(lambda envelope, error: heard.append((envelope.id, str(error))))
    smuggled = Envelope(id=new_id(), job="remember", source="api", payload={"n": 1})
    with mock.patch.object(Envelope, "encode", lambda self: b"not json at all"):
        app.broker.enqueue([smuggled])  # as a buggy producer in another language might
    good = app.enqueue("remember", {"n": 2})
    with serving(app):
        assert final(good)["state"] == "succeeded"
        info = final(app.handle(smuggled.id))
        wait_until(lambda: heard, deadline_s=20, what="the on_reject hook")
    assert info["state"] == "rejected" and info["reason"].startswith("malformed envelope")
    assert heard == [(smuggled.id, info["reason"])]


# -- claiming ahead --------------------------------------------------------------------------


def _claimed_ahead(app: backroom.App) -> tuple[backroom.Handle, list[backroom.Handle]]:
    """A job that blocks the only slot, then three that a worker claiming ahead holds."""
    blocker = app.enqueue("stuck_without_timeout", {"gate": "blocker"})
    waiting = app.enqueue_many("remember", [{"n": n} for n in range(3)])
    return blocker, waiting


def test_a_worker_that_turns_idle_claims_the_jobs_queued_all_along_without_waiting(
    app: backroom.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jobs that end at once leave the worker idle while its waiter thread sits in a wait it
    # began when the worker was busy; on Redis nothing wakes it for jobs queued all along (a
    # queue announces work only when it turns non-empty). Here such a wait lasts 5 s (the
    # broker's longest blocking read): the drain beats the deadline only if the idle worker
    # claims itself.
    monkeypatch.setattr(backroom.worker, "WAIT_S", 3600.0)
    handles = app.enqueue_many("remember", [{"n": n} for n in range(1500)])
    with serving(app):
        wait_until(
            lambda: app.broker.stats().jobs["remember"].counts.get("succeeded") == 1500,
            deadline_s=8,
            what="1,500 instant jobs to be drained with no wait running out",
        )
        last = app.enqueue("remember", {"n": -1})  # announces work: ends the waiter's wait
        assert final(last)["state"] == "succeeded"
    assert {h.status() for h in handles} == {"succeeded"}


def test_jobs_claimed_ahead_that_wait_too_long_go_back_for_other_workers(
    app: backroom.App,
) -> None:
    blocker, waiting = _claimed_ahead(app)
    with serving(app, concurrency=1, prefetch=3):
        wait_until(lambda: [h.status() for h in waiting] == ["running"] * 3, deadline_s=20,
                   what="the worker to claim the three behind the blocker")  # fmt: skip
        # about a second later they go back, their attempt uncounted, and are not claimed again
        wait_until(lambda: [h.status() for h in waiting] == ["queued"] * 3, deadline_s=20,
                   what="the jobs claimed ahead to go back to the queue")  # fmt: skip
        assert [r.attempts for r in app.broker.get_many([h.id for h in waiting])] == [0] * 3
        with serving(app, concurrency=2):  # another worker runs them; the blocker still holds
            assert [final(h)["state"] for h in waiting] == ["succeeded"] * 3
        assert blocker.status() == "running"
        app.gates["blocker"].set()  # type: ignore[attr-defined]
        assert final(blocker)["state"] == "succeeded"


def _offers(app: backroom.App) -> set[str]:
    """The workers with an offer out (Redis: claims that found too little offer to take what
    comes next, handed straight to the worker)."""
    assert isinstance(app.broker, RedisBroker)
    client = redis.Redis.from_url(app.broker.url.split("?")[0])
    return {worker.decode() for worker in client.hkeys("{" + app.broker.prefix + "}:o")}


def test_a_job_handed_to_a_busy_worker_with_a_free_slot_runs_beside_the_running_one(
    app: backroom.App,
) -> None:
    if not isinstance(app.broker, RedisBroker):
        pytest.skip("only Redis hands jobs over")
    blocker = app.enqueue("stuck_without_timeout", {"gate": "blocker"})
    with serving(app, concurrency=2, prefetch=0) as worker:
        wait_until(lambda: "blocker" in app.seen.get("entered", []),  # type: ignore[attr-defined]
                   deadline_s=20, what="the blocker to start")  # fmt: skip
        wait_until(lambda: worker.id in _offers(app), deadline_s=20,
                   what="the busy worker to offer its free slot")  # fmt: skip
        handed = app.enqueue("remember", {"n": 7})
        assert final(handed)["state"] == "succeeded"
        record = app.broker.get(handed.id)
        assert record is not None and record.worker_id == worker.id
        assert blocker.status() == "running"
        app.gates["blocker"].set()  # type: ignore[attr-defined]
        assert final(blocker)["state"] == "succeeded"


def test_a_stopping_worker_hands_back_the_jobs_handed_to_it_that_it_never_received(
    app: backroom.App,
) -> None:
    if not isinstance(app.broker, RedisBroker):
        pytest.skip("only Redis hands jobs over")
    # an offer out under this worker's id, and a job handed to it, still in its inbox
    assert app.broker.claim(["default"], "w-gone", 60, 4, offer=True) == []
    handle = app.enqueue("remember", {"n": 1})
    assert handle.status() == "running"
    worker = Worker(app, worker_id="w-gone")
    worker.stop()  # before it ever waits: it must not leave the job to its lease
    assert worker.run() == 0
    record = app.broker.get(handle.id)
    assert record is not None and (record.state, record.attempts) == ("queued", 0)
    assert "w-gone" not in _offers(app)


def test_a_worker_that_ended_never_claims_again_from_its_waiter_thread(app: backroom.App) -> None:
    worker = Worker(app, burst=True)
    assert worker.run() == 0  # nothing to do: it ends without being stopped
    handle = app.enqueue("remember", {"n": 1})
    # its waiter thread may still be blocked in a wait that this enqueue ends: it must not claim
    assert worker._wait_and_claim() == ([], (), None, ())
    assert handle.status() == "queued"


def test_a_stop_hands_back_jobs_claimed_ahead_at_once_and_lets_running_ones_finish(
    app: backroom.App,
) -> None:
    blocker, waiting = _claimed_ahead(app)
    worker = Worker(app, concurrency=1, prefetch=3, grace=30)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: [h.status() for h in waiting] == ["running"] * 3, deadline_s=20,
               what="the worker to claim the three behind the blocker")  # fmt: skip
    # a job claimed but not started yet goes back at a stop too: stop once the blocker runs
    wait_until(lambda: "blocker" in app.seen.get("entered", []),  # type: ignore[attr-defined]
               deadline_s=20, what="the blocker to start")  # fmt: skip
    worker.stop()
    wait_until(lambda: [h.status() for h in waiting] == ["queued"] * 3, deadline_s=20,
               what="the jobs claimed ahead to go back at once")  # fmt: skip
    assert blocker.status() == "running"  # within its grace period
    app.gates["blocker"].set()  # type: ignore[attr-defined]
    thread.join(20)
    assert not thread.is_alive()
    assert blocker.status() == "succeeded"
    records = app.broker.get_many([h.id for h in waiting])
    assert [(r.state, r.attempts) for r in records if r] == [("queued", 0)] * 3
    assert app.seen["ran"] == []  # type: ignore[attr-defined]


# -- recycling -------------------------------------------------------------------------------


def test_max_jobs_stops_reserving_after_that_many_and_asks_to_be_recycled(
    app: backroom.App,
) -> None:
    handles = app.enqueue_many("remember", [{"n": n} for n in range(5)])
    assert Worker(app, concurrency=1, max_jobs=3, child=True).run() == EXIT_RECYCLE
    assert [h.status() for h in handles] == ["succeeded"] * 3 + ["queued"] * 2


def test_max_memory_recycles_once_the_limit_is_passed(app: backroom.App) -> None:
    handles = app.enqueue_many("remember", [{"n": n} for n in range(3)])
    code = Worker(app, concurrency=1, max_memory_mb=1, child=True).run()
    assert code == EXIT_RECYCLE
    # the limit is checked after each job: the first one already finds it passed
    assert [h.status() for h in handles] == ["succeeded", "queued", "queued"]


# -- what a replacement child settles ---------------------------------------------------------


def test_jobs_taken_back_from_a_vanished_worker_reach_the_failure_and_dead_hooks(
    app: backroom.App,
) -> None:
    # "remember" has retries=0 (its lost attempt was its last: dead); "patient" goes back
    last, again = app.enqueue("remember", {"n": 1}), app.enqueue("patient", {"n": 2})
    claimed = app.broker.claim(["default"], "vanished", lease_s=0.3, limit=2)
    assert len(claimed) == 2  # the worker holding them is gone: nobody renews their leases
    heard: list[tuple[str, str, str]] = []
    app.on_failure(lambda env, exc: heard.append(("failure", env.job, type(exc).__name__)))
    app.on_dead(lambda env, exc: heard.append(("dead", env.job, type(exc).__name__)))
    with serving(app):
        assert final(last)["state"] == "dead"
        assert final(again)["state"] == "succeeded"
    assert sorted(heard) == [("dead", "remember", "LeaseExpired"),
                             ("failure", "patient", "LeaseExpired"),
                             ("failure", "remember", "LeaseExpired")]  # fmt: skip


def test_a_replacement_child_fails_the_jobs_its_crashed_predecessor_held(
    app: backroom.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed, bystander, cancelled = app.enqueue_many("remember", [{"n": n} for n in range(3)])
    claims = app.broker.claim(["default"], "dead-child", lease_s=600, limit=3)
    by_id = {c.id: c for c in claims}
    cancelled.cancel()
    orphans = [
        {
            "id": crashed.id,
            "attempt_id": by_id[crashed.id].attempt_id,
            "error": [
                "WorkerCrashed",
                "the worker process running this job (pid 7) died from signal 11 (SIGSEGV)",
            ],
        },
        {"id": bystander.id, "attempt_id": by_id[bystander.id].attempt_id, "release": True},
        {
            "id": cancelled.id,
            "attempt_id": by_id[cancelled.id].attempt_id,
            "error": ["WorkerCrashed", "died"],
        },
    ]
    monkeypatch.setenv(ORPHANS_ENV, json.dumps(orphans))
    failures: list[str] = []
    app.on_failure(lambda envelope, exc: failures.append(f"{type(exc).__name__}: {exc}"))
    worker = Worker(app, child=True, burst=True)
    assert ORPHANS_ENV not in os.environ  # read once, never passed on
    worker.run()
    info = crashed.info()
    assert info["state"] == "dead"  # retries=0: the crash used its only attempt
    assert info["error"]["type"] == "WorkerCrashed"
    assert info["error"]["message"].endswith("died from signal 11 (SIGSEGV)")
    assert failures == [f"WorkerCrashed: {info['error']['message']}"]
    # the innocent one was handed back uncounted and then ran; the cancelled one stays so
    assert (bystander.status(), bystander.info()["attempts"]) == ("succeeded", 1)
    assert cancelled.status() == "cancelled"
    assert app.seen["ran"] == [1]  # type: ignore[attr-defined]


def test_a_replacement_child_leaves_alone_a_job_that_moved_on(
    app: backroom.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = app.enqueue("patient", {"n": 1})
    [stale] = app.broker.claim(["default"], "dead-child", lease_s=1, limit=1)
    app.broker.sweep_expired(now=stale.lease_until + 1)  # its lease ran out first
    [fresh] = app.broker.claim(["default"], "other", lease_s=600, limit=1)
    orphan = {"id": handle.id, "attempt_id": stale.attempt_id, "error": ["WorkerCrashed", "x"]}
    monkeypatch.setenv(ORPHANS_ENV, json.dumps([orphan]))
    with serving(app, child=True, queues=["none"]):
        wait_until(app.broker.workers, deadline_s=20, what="the child to settle and register")
    assert handle.status() == "running"  # still the other worker's
    assert app.broker.ack([(fresh, 1)]) == [True]


def test_the_child_channel_tells_the_supervisor_what_a_child_holds() -> None:
    reader, writer = os.pipe()
    channel = ChildChannel(writer)
    child = _Child(slot=0, process=None, reader=reader)  # type: ignore[arg-type]
    channel.send("hello", "w1")
    channel.send("claim", [["a", "att-a", None], ["b", "att-b", None], ["c", "att-c", None]])
    channel.send("start", [["a", 12.5]])
    channel.send("start", [["b", None]])
    channel.send("done", ["b"])
    child.read()
    assert child.ready
    assert child.held == {"a": ("att-a", 12.5), "c": ("att-c", None)}
    assert child.running == {"a"}  # c was claimed ahead and has not started
    channel.send("reset")
    child.read()
    assert child.held == {}
    os.close(writer)
    child.read()
    assert child.reader is None  # EOF closes the supervisor's end


def test_a_child_that_stops_reading_never_blocks_and_tells_the_supervisor_to_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import backroom.supervisor as supervisor

    monkeypatch.setattr(supervisor, "MAX_BACKLOG_BYTES", 10_000)
    reader, writer = os.pipe()
    channel = ChildChannel(writer)
    child = _Child(slot=0, process=None, reader=reader)  # type: ignore[arg-type]
    for n in range(5000):  # far more than the pipe holds: the supervisor is not reading
        channel.send("claim", [[f"job-{n}", "attempt", None]])
    child.read()  # what fit in the pipe, then a reset: those claims fall back to their lease
    channel.send("claim", [["last", "attempt", None]])
    child.read()
    assert "job-0" not in child.held  # forgotten at the reset
    assert child.held["last"] == ("attempt", None)  # what came after it is known again
    assert len(child.held) < 5000
    os.close(writer)


def test_a_crashed_child_s_started_jobs_fail_and_the_ones_claimed_ahead_go_back() -> None:
    import subprocess
    import sys

    from backroom.supervisor import Supervisor

    crashing = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 11)"])
    supervisor = Supervisor(["--lease", "60"], 1, burst=False, scheduler=False)
    child = _Child(slot=0, process=crashing, reader=None)
    child.held = {"culprit": ("a1", None), "waiting": ("a2", None)}
    child.running = {"culprit"}
    supervisor._bury(child, crashing.wait(timeout=30))
    orphans = {o["id"]: o for o in supervisor._orphans[0]}
    assert orphans["culprit"]["error"][0] == "WorkerCrashed"
    assert "signal 11" in orphans["culprit"]["error"][1]
    assert orphans["waiting"] == {"id": "waiting", "attempt_id": "a2", "release": True}


def test_the_supervisor_kills_a_child_frozen_past_a_job_timeout_and_names_the_culprit() -> None:
    import subprocess
    import sys

    from backroom.supervisor import FROZEN_PAST_DEADLINE_S, Supervisor

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor(["--lease", "60", "--grace", "5"], 1, burst=False, scheduler=False)
    assert (supervisor.lease, supervisor.grace) == (60.0, 5.0)
    child = _Child(slot=0, process=sleeper, reader=None)
    child.ready = True
    past = time.time() - FROZEN_PAST_DEADLINE_S - 1
    child.held = {"stuck": ("a1", past), "bystander": ("a2", None), "later": ("a3", time.time())}
    child.running = set(child.held)
    supervisor._watch(child)  # it beats: nothing happens
    assert sleeper.poll() is None
    child.last_beat -= FROZEN_PAST_DEADLINE_S + 1  # silent, with a job overdue
    supervisor._watch(child)
    code = sleeper.wait(timeout=10)
    supervisor._bury(child, code)
    orphans = {o["id"]: o for o in supervisor._orphans[0]}
    assert orphans["stuck"]["error"][0] == "JobTimeout"
    assert f"(pid {sleeper.pid}), which was killed" in orphans["stuck"]["error"][1]
    assert orphans["bystander"] == {"id": "bystander", "attempt_id": "a2", "release": True}
    assert orphans["later"]["release"] is True
