"""The Broker contract, part 3: what users read back. Records (get, get_many, jobs with filters
and cursor pages), waiting (wait_finished, wait_for_work), stats, live workers, and purge. Every
test runs unchanged on memory, sqlite and redis; waits poll to a deadline, never sleep and hope."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from backroom.brokers import Broker, Claim, JobQuery, WorkerInfo
from backroom.envelope import State
from tests.brokers.test_conformance import (
    FAILURE,
    LEASE_S,
    T,
    claim_all,
    claim_one,
    enqueue_one,
    ids_of,
    job_in_state,
    second_connection,
)
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(30)

UNKNOWN_ID = "0000000000000nosuchjob0"


# -- records -----------------------------------------------------------------------------------


def test_get_returns_none_for_an_unknown_id(broker: Broker) -> None:
    assert broker.get(UNKNOWN_ID) is None


def test_get_many_returns_records_in_the_order_asked_with_none_for_unknown_ids(
    broker: Broker,
) -> None:
    a = enqueue_one(broker, "resize_video")
    b = enqueue_one(broker, "send_email")
    records = broker.get_many([b, UNKNOWN_ID, a, b])
    assert [None if r is None else (r.id, r.job) for r in records] == [
        (b, "send_email"),
        None,
        (a, "resize_video"),
        (b, "send_email"),
    ]
    assert broker.get_many([]) == []


def test_jobs_lists_the_newest_first(broker: Broker) -> None:
    singles = [enqueue_one(broker, now=T + n) for n in range(3)]
    batch = broker.enqueue([envelope_for("send_email") for _ in range(3)], now=T + 5)
    assert ids_of(broker.jobs(JobQuery())) == list(reversed(singles + batch))


def test_jobs_filters_by_state_job_name_and_tag(broker: Broker) -> None:
    running = enqueue_one(broker, "resize_video", tags=("edge-2",), queue="work")
    succeeded = enqueue_one(broker, "send_email", tags=("edge-1", "billing"), queue="work")
    queued_video = enqueue_one(broker, "resize_video", tags=("edge-1",))
    queued_email = enqueue_one(broker, "send_email", tags=("edge-1",))
    claims = {c.id: c for c in broker.claim(["work"], "w1", LEASE_S, limit=2, now=T)}
    assert broker.ack([(claims[succeeded], None)], now=T + 1) == [True]

    def listed(
        state: State | None = None, job: str | None = None, tag: str | None = None
    ) -> list[str]:
        return ids_of(broker.jobs(JobQuery(state=state, job=job, tag=tag)))

    assert listed(state=State.QUEUED) == [queued_email, queued_video]
    assert listed(state=State.RUNNING) == [running]
    assert listed(state=State.SUCCEEDED) == [succeeded]
    assert listed(state=State.DEAD) == []
    assert listed(job="resize_video") == [queued_video, running]
    assert listed(job="no_such_job") == []
    assert listed(tag="edge-1") == [queued_email, queued_video, succeeded]
    assert listed(tag="billing") == [succeeded]
    assert listed(state=State.QUEUED, job="send_email") == [queued_email]
    assert listed(tag="edge-1", job="send_email") == [queued_email, succeeded]
    assert listed(tag="edge-1", state=State.RUNNING) == []
    assert listed(tag="edge-2", state=State.RUNNING, job="resize_video") == [running]


def test_jobs_pages_through_everything_with_limit_and_the_before_cursor(broker: Broker) -> None:
    ids = [enqueue_one(broker, tags=("even",) if n % 2 == 0 else ()) for n in range(10)]

    def pages(query: JobQuery) -> list[list[str]]:
        found: list[list[str]] = []
        while page := ids_of(broker.jobs(query)):
            assert len(found) < 20, "the cursor does not advance"
            found.append(page)
            query = dataclasses.replace(query, before=page[-1])
        return found

    everything = pages(JobQuery(limit=4))
    assert [len(page) for page in everything] == [4, 4, 2]
    assert [job_id for page in everything for job_id in page] == list(reversed(ids))
    evens = pages(JobQuery(tag="even", limit=2))
    assert [job_id for page in evens for job_id in page] == list(reversed(ids[0::2]))
    assert ids_of(broker.jobs(JobQuery(limit=3, before=ids[5]))) == [ids[4], ids[3], ids[2]]


# -- waiting -----------------------------------------------------------------------------------


def test_wait_finished_returns_the_final_record_once_another_connection_finishes_the_job(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker)
    with second_connection(broker) as other:
        finisher = threading.Thread(
            target=lambda: other.ack([(claim, {"frames": 240})], now=T + 1), daemon=True
        )
        finisher.start()
        record = broker.wait_finished(job_id, timeout_s=20)
        finisher.join(timeout=20)
    assert record is not None
    assert (record.state, record.result) == (State.SUCCEEDED, {"frames": 240})


def test_wait_finished_returns_a_finished_jobs_record_whatever_the_outcome(
    broker: Broker,
) -> None:
    job_id = job_in_state(broker, State.DEAD)
    record = broker.wait_finished(job_id, timeout_s=20)
    assert record is not None
    assert (record.state, record.error) == (State.DEAD, FAILURE)


def test_wait_finished_times_out_returning_the_current_record(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    record = broker.wait_finished(job_id, timeout_s=0.05)
    assert record is not None
    assert (record.id, record.state) == (job_id, State.QUEUED)


def test_wait_finished_returns_none_for_an_unknown_job(broker: Broker) -> None:
    assert broker.wait_finished(UNKNOWN_ID, timeout_s=0.05) is None


def test_wait_for_work_wakes_a_worker_when_another_thread_enqueues(broker: Broker) -> None:
    queues = ["default"]
    envelope = envelope_for("resize_video")
    waiting = threading.Event()
    with second_connection(broker) as producer:

        def produce() -> None:
            waiting.wait(timeout=20)
            producer.enqueue([envelope])

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        claimed: list[Claim] = []
        deadline = time.monotonic() + 20
        while not claimed and time.monotonic() < deadline:
            waiting.set()  # may run before the wait begins: the loop below claims it anyway
            broker.wait_for_work(queues, timeout_s=0.5)
            claimed = broker.claim(queues, "w1", LEASE_S, limit=1)
        thread.join(timeout=20)
    assert ids_of(claimed) == [envelope.id]


def test_wait_for_work_returns_after_its_timeout_when_nothing_comes(broker: Broker) -> None:
    broker.wait_for_work(["default"], timeout_s=0.05)
    assert claim_all(broker) == []


# -- stats -------------------------------------------------------------------------------------


def test_stats_count_jobs_by_state_per_job_name(broker: Broker) -> None:
    for state in (State.QUEUED, State.QUEUED, State.RUNNING, State.SUCCEEDED, State.SCHEDULED):
        job_in_state(broker, state, "resize_video")
    for state in (State.DEAD, State.REJECTED, State.CANCELLED, State.RETRYING):
        job_in_state(broker, state, "send_email")
    stats = broker.stats()
    assert set(stats.jobs) == {"resize_video", "send_email"}
    video, email = stats.jobs["resize_video"], stats.jobs["send_email"]
    assert (video.job, email.job) == ("resize_video", "send_email")
    assert {k: n for k, n in video.counts.items() if n} == {
        "queued": 2,
        "running": 1,
        "succeeded": 1,
        "scheduled": 1,
    }
    assert {k: n for k, n in email.counts.items() if n} == {
        "dead": 1,
        "rejected": 1,
        "cancelled": 1,
        "retrying": 1,
    }
    assert (email.retries, dict(email.rejections)) == (1, {"unknown job 'resize_video'": 1})


def test_stats_measure_wait_and_run_time_per_job(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video") for _ in range(10)], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=10, now=T + 3)  # each waited 3 s
    for run_s, claim in enumerate(claims, start=1):  # runs of 1, 2, ... 10 s
        assert broker.ack([(claim, None)], now=T + 3 + run_s) == [True]
    video = broker.stats().jobs["resize_video"]
    wait, run = video.wait_time, video.run_time
    assert wait.count == 10
    assert (wait.max, wait.total) == pytest.approx((3.0, 30.0))
    assert wait.quantile(0.5) == pytest.approx(3.0)
    assert run.count == 10
    assert (run.max, run.total) == pytest.approx((10.0, 55.0))
    p50, p95 = run.quantile(0.5), run.quantile(0.95)
    assert p50 is not None and 5.0 <= p50 <= 6.25  # the bucket holding the 5th sample
    assert p95 is not None and 9.0 <= p95 <= 10.0
    assert run.quantile(1.0) == pytest.approx(10.0)
    assert "send_email" not in broker.stats().jobs


def test_stats_count_a_failed_attempt_in_run_time(broker: Broker) -> None:
    enqueue_one(broker, now=T)
    claim = claim_one(broker, now=T + 1)
    assert broker.nack(claim, FAILURE, retry_at=None, now=T + 5) is True
    run = broker.stats().jobs["resize_video"].run_time
    assert run.count == 1
    assert run.max == pytest.approx(4.0)


def test_stats_report_the_queued_depth_of_each_queue(broker: Broker) -> None:
    for _ in range(3):
        enqueue_one(broker, queue="default")
    enqueue_one(broker, queue="media")
    enqueue_one(broker, queue="later", eta=T + 60)  # scheduled: not in a queue yet
    broker.pause("media")  # paused jobs still wait in their queue

    def depths() -> dict[str, int]:
        return {queue: n for queue, n in broker.stats().queues.items() if n}

    assert depths() == {"default": 3, "media": 1}
    broker.claim(["default"], "w1", LEASE_S, limit=2, now=T)
    assert depths() == {"default": 1, "media": 1}
    broker.promote_due(now=T + 60)
    assert depths() == {"default": 1, "media": 1, "later": 1}


# -- workers -----------------------------------------------------------------------------------


def test_registered_workers_are_listed_until_their_heartbeat_expires(broker: Broker) -> None:
    first = WorkerInfo(
        id="w1",
        host="edge-1",
        pid=4242,
        queues=("high", "default"),
        concurrency=8,
        started_at=T,
        seen_at=T,
        current=("job-a", "job-b"),
    )
    second = WorkerInfo(
        id="w2",
        host="edge-2",
        pid=77,
        queues=("default",),
        concurrency=1,
        started_at=T + 2,
        seen_at=T + 4,
    )
    broker.register_worker(first, ttl_s=10)
    broker.register_worker(second, ttl_s=10)

    def live(now: float) -> list[WorkerInfo]:
        return sorted(broker.workers(now=now), key=lambda w: w.id)

    assert live(T + 5) == [first, second]
    assert live(T + 12) == [second]
    assert live(T + 15) == []
    heartbeat = WorkerInfo(
        id="w1",
        host="edge-1",
        pid=4242,
        queues=("high", "default"),
        concurrency=8,
        started_at=T,
        seen_at=T + 20,
    )
    broker.register_worker(heartbeat, ttl_s=10)
    assert live(T + 21) == [heartbeat]
    broker.unregister_worker("w1")
    assert live(T + 21) == []
    broker.unregister_worker("never-registered")


# -- purge -------------------------------------------------------------------------------------


def test_purge_drops_jobs_counters_unique_keys_pauses_schedules_and_workers(
    broker: Broker,
) -> None:
    queued = enqueue_one(broker, unique_key="video:7", tags=("edge-1",))
    finished = job_in_state(broker, State.SUCCEEDED)
    broker.pause("media")
    assert broker.fire_once("invoices", T) is True
    broker.register_worker(
        WorkerInfo(
            id="w1", host="h", pid=1, queues=("default",), concurrency=1, started_at=T, seen_at=T
        ),
        ttl_s=60,
    )
    broker.purge()
    assert broker.get_many([queued, finished]) == [None, None]
    assert broker.jobs(JobQuery()) == []
    assert broker.jobs(JobQuery(tag="edge-1")) == []
    assert broker.stats().jobs == {}
    assert {q: n for q, n in broker.stats().queues.items() if n} == {}
    assert broker.paused() == set()
    assert broker.last_fired("invoices") is None
    assert broker.fire_once("invoices", T) is True
    assert broker.workers(now=T) == []
    assert claim_all(broker) == []
    assert enqueue_one(broker, unique_key="video:7") != queued
