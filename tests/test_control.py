"""Steering work before it runs: unique jobs in each unique_for mode (and a race of 8 processes),
expiry, paused queues, priorities and queue order, and cancelling scheduled, queued and retrying
jobs, through the App, real workers and the `backroom` command. App level on every broker."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import backroom
from backroom.brokers import JobQuery
from backroom.errors import BackroomError
from tests.apps import ledger
from tests.apps.scheduled import HAS_REDIS_BROKER, Harness, broker_url, cli, race
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

REDIS = [pytest.param("redis", marks=pytest.mark.redis)] if HAS_REDIS_BROKER else []
BACKENDS = ["memory", "sqlite", *REDIS]
SHARED_BACKENDS = ["sqlite", *REDIS]  # brokers several processes can share


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    built = Harness(broker_url(request.param, tmp_path, request))
    built.app.broker.purge()  # redis is shared by the session
    yield built
    built.release_all()
    built.app.broker.purge()
    built.app.close()


def states(*handles: backroom.Handle) -> list[str]:
    return [handle.status() for handle in handles]


def job_count(app: backroom.App) -> int:
    return len(app.broker.jobs(JobQuery(limit=1000)))


# -- unique jobs ---------------------------------------------------------------------------------


def test_a_second_enqueue_returns_the_live_jobs_handle_until_it_finishes(harness: Harness) -> None:
    app = harness.app

    def again() -> backroom.Handle:
        return app.enqueue("hold", {"label": "duplicate"}, unique_key="logs:edge-1")

    first = app.enqueue("hold", {"label": "first"}, unique_key="logs:edge-1", delay=60)
    assert again() == first and first.status() == "scheduled"
    assert app.broker.promote_due(now=time.time() + 61) == 1
    assert again() == first and first.status() == "queued"
    assert app.enqueue_many("hold", [{"label": "a"}, {"label": "b"}],
                            unique_key="logs:edge-1") == [first, first]  # fmt: skip
    with harness.worker(concurrency=2):
        wait_until(lambda: first.status() == "running", 20, "the unique job to start")
        waiting = again()
        assert waiting == first  # the caller can wait for the running job's result
        harness.release("first")
        assert waiting.result(timeout=20) == "first"
        fresh = again()  # finished: the key is free
        assert fresh != first
        harness.release("duplicate")
        assert fresh.result(timeout=20) == "duplicate"
    assert harness.ran == ["first", "duplicate"]
    assert job_count(app) == 2


def test_a_key_held_until_start_lets_one_job_wait_while_another_runs(harness: Harness) -> None:
    app = harness.app

    def sync(label: str) -> backroom.Handle:
        return app.enqueue("hold", {"label": label}, unique_key="sync:crm", unique_for="start")

    with harness.worker(concurrency=1):
        running = sync("one")
        wait_until(lambda: running.status() == "running", 20, "the first sync to start")
        waiting = sync("two")
        assert waiting != running  # started: the key is free again
        assert sync("three") == waiting  # queued behind it: held until it starts
        harness.release("one")
        wait_until(lambda: waiting.status() == "running", 20, "the second sync to start")
        harness.release("two")
        assert waiting.result(timeout=20) == "two"
    assert harness.ran == ["one", "two"]


def test_a_key_held_for_seconds_throttles_even_after_the_job_finished(harness: Harness) -> None:
    app = harness.app
    now = time.time()

    def daily_report(at: float) -> backroom.Handle:
        return harness.enqueue_at(at, "note", {"label": f"report@{at - now:g}"},
                                  unique_key="report:daily", unique_for=60)  # fmt: skip

    first = daily_report(now)
    assert app.run_worker(burst=True) == 0
    assert first.status() == "succeeded"
    assert daily_report(now + 59) == first  # finished, but within a minute of its enqueue
    second = daily_report(now + 61)
    assert second != first and second.status() == "queued"
    assert daily_report(now + 120) == second
    assert daily_report(now + 122) not in (first, second)


def test_unique_for_needs_a_key_and_a_known_mode(harness: Harness) -> None:
    app = harness.app
    with pytest.raises(BackroomError, match="unique_for needs a unique_key"):
        app.enqueue("note", {"label": "x"}, unique_for="start")
    with pytest.raises(BackroomError, match="unique_for must be 'start', 'finish' or a number"):
        app.enqueue("note", {"label": "x"}, unique_key="k", unique_for="forever")
    with pytest.raises(BackroomError, match="unique_for seconds must be > 0"):
        app.enqueue("note", {"label": "x"}, unique_key="k", unique_for=0)
    assert job_count(app) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SHARED_BACKENDS)
def test_one_unique_key_enqueued_1000_times_from_8_processes_creates_one_job(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = broker_url(kind, tmp_path, request)
    app = Harness(url).app
    app.broker.purge()
    outcomes = race("unique", url, "logs:edge-1:2033-05-18", "125", processes=8)
    assert sum(outcome["count"] for outcome in outcomes) == 1000
    returned = {job_id for outcome in outcomes for job_id in outcome["ids"]}
    assert len(returned) == 1
    [record] = app.broker.jobs(JobQuery(limit=10))
    assert {record.id} == returned and record.state == "queued"
    assert app.broker.stats().jobs["report"].counts == {"queued": 1}
    app.broker.purge()
    app.close()


# -- expiry --------------------------------------------------------------------------------------


def test_a_job_not_started_before_it_expires_never_runs_and_ends_cancelled_expired(
    harness: Harness,
) -> None:
    app = harness.app
    stale = app.enqueue("note", {"label": "stale"}, expires=30)
    fresh = app.enqueue("note", {"label": "fresh"}, expires=3600)
    assert stale.info()["expires"] == pytest.approx(stale.info()["created_at"] + 30)
    a_minute_later = time.time() + 60
    claims = app.broker.claim(["default"], "w1", 30, limit=10, now=a_minute_later)
    assert [claim.id for claim in claims] == [fresh.id]  # still in time a minute later
    info = stale.info()
    assert (info["state"], info["reason"]) == ("cancelled", "expired")
    assert info["started_at"] is None and info["attempts"] == 0
    with pytest.raises(backroom.JobFailed, match="expired"):
        stale.result(timeout=1)


def test_a_worker_skips_a_job_whose_expiry_has_passed(harness: Harness) -> None:
    app = harness.app
    now = datetime.now(UTC)
    expired = app.enqueue("note", {"label": "expired"}, expires=now - timedelta(seconds=1))
    in_time = app.enqueue("note", {"label": "in time"}, expires=now + timedelta(hours=1))
    assert app.run_worker(burst=True, concurrency=1) == 0
    assert harness.ran == ["in time"]
    assert states(expired, in_time) == ["cancelled", "succeeded"]
    assert expired.info()["reason"] == "expired"


def test_a_delayed_job_whose_expiry_comes_before_its_eta_never_starts(harness: Harness) -> None:
    app = harness.app
    handle = app.enqueue("note", {"label": "too late"}, delay=60, expires=30)
    due = time.time() + 61
    app.broker.promote_due(now=due)  # ends it "expired" rather than queueing it
    assert app.broker.claim(["default"], "w1", 30, limit=10, now=due) == []
    assert (handle.status(), handle.info()["reason"]) == ("cancelled", "expired")
    assert app.run_worker(burst=True) == 0
    assert harness.ran == []


def test_expires_must_be_positive_seconds_or_a_datetime(harness: Harness) -> None:
    for bad in (0, -5, "soon"):
        with pytest.raises(BackroomError, match="expires must be seconds > 0 or a datetime"):
            harness.app.enqueue("note", {"label": "x"}, expires=bad)


# -- paused queues -------------------------------------------------------------------------------


def test_a_paused_queue_holds_its_jobs_while_another_queue_keeps_draining(
    harness: Harness,
) -> None:
    app = harness.app
    app.broker.pause("media")
    held = app.enqueue("transcode", {"label": "video-7"})  # enqueue keeps working
    assert held.status() == "queued"
    with harness.worker(queues=["media", "default"], concurrency=1):
        drained = [app.enqueue("note", {"label": f"email-{n}"}) for n in range(3)]
        wait_until(lambda: states(*drained) == ["succeeded"] * 3, 20, "the default queue")
        assert held.status() == "queued"
        assert app.broker.paused() == {"media"}
        app.broker.resume("media")
        wait_until(lambda: held.status() == "succeeded", 20, "the resumed queue to drain")
    assert harness.ran == ["email-0", "email-1", "email-2", "video-7"]


def test_backroom_queue_pause_stops_every_worker_reserving_from_that_queue(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    harness = Harness(url)
    app = harness.app
    held = app.enqueue("transcode", {"label": "video-7"})
    out = cli("queue", "pause", "--app", "tests.apps.scheduled:app", "media", url=url).stdout
    assert "paused" in out
    assert app.broker.paused() == {"media"}
    assert app.run_worker(burst=True, queues=["default"]) == 0  # a worker can't take it
    assert app.broker.claim(["media"], "w1", 30, limit=1) == []
    assert held.status() == "queued"
    cli("queue", "resume", "--app", "tests.apps.scheduled:app", "media", url=url)
    assert app.broker.paused() == set()
    assert app.run_worker(burst=True, queues=["media"]) == 0
    assert held.result(timeout=5) == "video-7"
    app.close()


# -- priorities and queue order ------------------------------------------------------------------


def test_higher_priority_runs_first_within_a_queue_and_queues_in_the_order_given(
    harness: Harness,
) -> None:
    app = harness.app
    for label, priority in [("d-low", -5), ("d-default", 0), ("d-urgent", 10), ("d-default-2", 0)]:
        app.enqueue("note", {"label": label}, priority=priority)
    for label, priority in [("m-default", 0), ("m-urgent", 3)]:
        app.enqueue("transcode", {"label": label}, priority=priority)
    app.enqueue("note", {"label": "h-only"}, queue="high")
    assert app.run_worker(burst=True, concurrency=1, queues=["high", "media", "default"]) == 0
    assert harness.ran == [
        "h-only",
        "m-urgent", "m-default",
        "d-urgent", "d-default", "d-default-2", "d-low",
    ]  # fmt: skip


def test_a_worker_process_serves_queues_high_then_default_in_priority_order(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    ledger_db = tmp_path / "ledger.db"
    app = backroom.App(url, source="api")
    app.registry = ledger.app.registry  # the ledger's jobs, on this test's own broker
    plan = [(1, "default", 0), (2, "default", 5), (3, "high", 0), (4, "default", 5),
            (5, "high", 9), (6, "low", 100), (7, "default", -1), (8, "high", 0)]  # fmt: skip
    for n, queue, priority in plan:
        app.enqueue("record", {"n": n}, queue=queue, priority=priority)
    cli("worker", "--app", "tests.apps.ledger:app", "--queues", "high,default", "--burst",
        "--in-process", "--concurrency", "1", url=url,
        env={"LEDGER_DB": str(ledger_db)})  # fmt: skip
    with sqlite3.connect(ledger_db) as db:
        order = [n for (n,) in db.execute("SELECT n FROM runs ORDER BY rowid")]
    assert order == [5, 3, 8, 2, 4, 1, 7]  # the low queue is not served by this worker
    assert app.broker.stats().queues == {"low": 1}
    app.close()


# -- cancellation --------------------------------------------------------------------------------


def test_a_cancelled_scheduled_or_queued_job_never_runs(harness: Harness) -> None:
    app = harness.app
    scheduled = app.enqueue("note", {"label": "scheduled"}, delay=60)
    queued = app.enqueue("note", {"label": "queued"})
    kept = app.enqueue("note", {"label": "kept"})
    assert scheduled.cancel() is True and queued.cancel() is True
    assert states(scheduled, queued, kept) == ["cancelled", "cancelled", "queued"]
    assert scheduled.info()["reason"] == "cancelled by api"
    assert app.broker.promote_due(now=time.time() + 3600) == 0  # cancelled stays cancelled
    assert app.run_worker(burst=True) == 0
    assert harness.ran == ["kept"]
    assert scheduled.cancel() is False and kept.cancel() is False  # already finished
    with pytest.raises(backroom.JobFailed, match="cancelled"):
        queued.result(timeout=1)


def test_a_cancelled_retrying_job_is_not_retried(harness: Harness) -> None:
    app = harness.app
    with harness.worker():
        handle = app.enqueue("fail_once", {"label": "flaky"})
        wait_until(lambda: handle.status() == "retrying", 20, "the first attempt to fail")
    assert handle.cancel() is True
    assert app.broker.promote_due(now=time.time() + 3600) == 0
    assert app.run_worker(burst=True) == 0
    assert harness.ran == ["flaky"]
    info = handle.info()
    assert (info["state"], info["attempts"]) == ("cancelled", 1)


def test_a_cancelled_job_frees_its_unique_key(harness: Harness) -> None:
    app = harness.app
    first = app.enqueue("note", {"label": "first"}, unique_key="invoice:2033-05")
    assert first.cancel() is True
    second = app.enqueue("note", {"label": "second"}, unique_key="invoice:2033-05")
    assert second != first
    assert app.run_worker(burst=True) == 0
    assert harness.ran == ["second"]


def test_backroom_cancel_takes_back_a_delayed_job_before_it_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    app = Harness(url).app
    target = "tests.apps.scheduled:app"
    job_id = cli("enqueue", "--app", target, "report", '{"kind": "later"}', "--delay", "3600",
                 url=url).stdout.strip()  # fmt: skip
    assert app.handle(job_id).status() == "scheduled"
    assert "cancelled" in cli("cancel", "--app", target, job_id, url=url).stdout
    again = cli("cancel", "--app", target, job_id, url=url, ok=False)
    assert "already finished (cancelled)" in again.stderr
    assert app.broker.promote_due(now=time.time() + 7200) == 0
    assert app.run_worker(burst=True) == 0
    info = app.handle(job_id).info()
    assert (info["state"], info["started_at"], info["attempts"]) == ("cancelled", None, 0)
    app.close()
