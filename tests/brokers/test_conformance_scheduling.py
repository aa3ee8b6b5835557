"""The Broker contract, part 2: time and control. Delays (eta, promote_due), expiry, paused
queues, unique keys in each unique_for mode, single-fire schedule ticks and pruning. Every test
runs unchanged on memory, sqlite and redis; time moves through `now=`, never by sleeping."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from threading import Lock

import pytest

from backroom.brokers import Broker, JobQuery
from backroom.envelope import FINAL_STATES, State
from tests.brokers.test_conformance import (
    FAILURE,
    LEASE_S,
    T,
    claim_all,
    claim_one,
    enqueue_one,
    ids_of,
    job_in_state,
    record_of,
    run_threads,
    second_connection,
    state_of,
)
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(30)


# -- delays ------------------------------------------------------------------------------------


def test_a_job_with_a_future_eta_is_scheduled_and_not_claimable(broker: Broker) -> None:
    job_id = enqueue_one(broker, eta=T + 60, now=T)
    assert state_of(broker, job_id) == State.SCHEDULED
    assert claim_all(broker, now=T) == []
    assert claim_all(broker, now=T + 59) == []


def test_a_job_whose_eta_is_already_reached_is_queued_at_once(broker: Broker) -> None:
    past = enqueue_one(broker, eta=T - 5, now=T)
    exactly_now = enqueue_one(broker, eta=T, now=T)
    assert [state_of(broker, past), state_of(broker, exactly_now)] == [State.QUEUED] * 2
    assert ids_of(claim_all(broker, now=T)) == [past, exactly_now]


def test_promote_due_queues_a_scheduled_job_once_its_eta_is_reached_and_not_before(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker, eta=T + 60, now=T)
    assert broker.promote_due(now=T + 59) == 0
    assert state_of(broker, job_id) == State.SCHEDULED
    assert broker.promote_due(now=T + 70) == 1
    record = record_of(broker, job_id)
    assert record.state == State.QUEUED
    assert record.queued_at == pytest.approx(T + 60)  # runnable since its eta, not since promotion
    assert broker.promote_due(now=T + 70) == 0
    assert claim_one(broker, now=T + 70).id == job_id


def test_promote_due_moves_at_most_its_limit_earliest_due_first(broker: Broker) -> None:
    etas = [T + 50, T + 10, T + 40, T + 20, T + 30]
    ids = [enqueue_one(broker, eta=eta, now=T) for eta in etas]
    by_due = [job_id for _, job_id in sorted(zip(etas, ids, strict=True))]
    assert broker.promote_due(now=T + 100, limit=2) == 2
    assert [state_of(broker, job_id) for job_id in by_due] == [State.QUEUED] * 2 + [
        State.SCHEDULED
    ] * 3
    assert broker.promote_due(now=T + 100, limit=10) == 3
    assert broker.promote_due(now=T + 100, limit=10) == 0
    assert sorted(ids_of(claim_all(broker, now=T + 100))) == sorted(ids)


# -- expiry ------------------------------------------------------------------------------------


def test_a_job_past_its_expiry_is_never_claimed_and_ends_cancelled_expired(
    broker: Broker,
) -> None:
    stale = enqueue_one(broker, expires=T + 10, now=T)
    fresh = enqueue_one(broker, expires=T + 100, now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=1, now=T + 11)
    assert ids_of(claims) == [fresh]
    record = record_of(broker, stale)
    assert (record.state, record.reason) == (State.CANCELLED, "expired")
    assert claim_all(broker, now=T + 12) == []


def test_a_job_whose_expiry_passes_before_its_eta_never_starts(broker: Broker) -> None:
    job_id = enqueue_one(broker, eta=T + 60, expires=T + 30, now=T)
    broker.promote_due(now=T + 60)
    assert claim_all(broker, now=T + 60) == []
    record = record_of(broker, job_id)
    assert (record.state, record.reason) == (State.CANCELLED, "expired")


def test_promote_due_ends_waiting_jobs_past_their_expiry_even_in_a_paused_queue(
    broker: Broker,
) -> None:
    broker.pause("media")
    held = enqueue_one(broker, queue="media", expires=T + 10, now=T)
    late = enqueue_one(broker, eta=T + 60, expires=T + 30, now=T)
    broker.promote_due(now=T + 31)
    for job_id in (held, late):
        record = record_of(broker, job_id)
        assert (record.state, record.reason) == (State.CANCELLED, "expired")
    stats = broker.stats()
    assert stats.queues.get("media", 0) == 0


def test_a_job_claimed_before_its_expiry_runs_normally(broker: Broker) -> None:
    job_id = enqueue_one(broker, expires=T + 10, now=T)
    claim = claim_one(broker, now=T + 9)
    assert broker.ack([(claim, "in time")], now=T + 20) == [True]
    assert state_of(broker, job_id) == State.SUCCEEDED


# -- paused queues -----------------------------------------------------------------------------


def test_a_paused_queue_is_skipped_by_claim_while_enqueue_keeps_working(broker: Broker) -> None:
    broker.pause("media")
    assert broker.paused() == {"media"}
    held = enqueue_one(broker, queue="media", now=T)
    other = enqueue_one(broker, queue="default", now=T)
    assert state_of(broker, held) == State.QUEUED
    assert ids_of(claim_all(broker, ["media", "default"], now=T + 1)) == [other]
    assert claim_all(broker, ["media"], now=T + 2) == []
    broker.resume("media")
    assert broker.paused() == set()
    assert claim_one(broker, ["media"], now=T + 3).id == held


def test_a_pause_holds_for_every_connection_and_pausing_twice_is_one_pause(
    broker: Broker,
) -> None:
    with second_connection(broker) as other:
        broker.pause("media")
        broker.pause("media")
        assert other.paused() == {"media"}
        held = enqueue_one(other, queue="media", now=T)
        assert claim_all(other, ["media"], now=T) == []
        other.resume("media")
        assert broker.paused() == set()
        assert claim_one(broker, ["media"], now=T + 1).id == held


# -- unique keys -------------------------------------------------------------------------------


def test_a_second_enqueue_with_a_held_unique_key_returns_the_existing_job(broker: Broker) -> None:
    def again(now: float) -> str:
        return enqueue_one(broker, unique_key="logs:edge-1", now=now)

    first = enqueue_one(broker, unique_key="logs:edge-1", eta=T + 10, now=T)
    assert again(T + 1) == first  # scheduled
    broker.promote_due(now=T + 10)
    assert again(T + 11) == first  # queued
    claim = claim_one(broker, now=T + 12)
    assert again(T + 13) == first  # running
    assert broker.nack(claim, FAILURE, retry_at=T + 100, now=T + 14) is True
    assert again(T + 15) == first  # retrying: it will run again
    assert ids_of(broker.jobs(JobQuery())) == [first]


@pytest.mark.parametrize("final", [State.SUCCEEDED, State.DEAD, State.CANCELLED, State.REJECTED])
def test_a_unique_key_held_until_finish_is_free_once_the_job_ends(
    broker: Broker, final: State
) -> None:
    first = job_in_state(broker, final, unique_key="invoice:2033-05", at=T)
    second = enqueue_one(broker, unique_key="invoice:2033-05", now=T + 1)
    assert second != first
    assert state_of(broker, second) == State.QUEUED
    assert enqueue_one(broker, unique_key="invoice:2033-05", now=T + 2) == second


def test_a_unique_key_held_until_start_is_free_once_the_job_is_claimed(broker: Broker) -> None:
    first = enqueue_one(broker, unique_key="sync:crm", unique_for="start", now=T)
    assert enqueue_one(broker, unique_key="sync:crm", unique_for="start", now=T + 1) == first
    assert claim_one(broker, now=T + 2).id == first
    second = enqueue_one(broker, unique_key="sync:crm", unique_for="start", now=T + 3)
    assert second != first
    assert enqueue_one(broker, unique_key="sync:crm", unique_for="start", now=T + 4) == second


def test_a_unique_key_held_for_seconds_lasts_that_long_after_enqueue_even_past_the_finish(
    broker: Broker,
) -> None:
    def enqueue_at(now: float) -> str:
        return enqueue_one(broker, unique_key="report:daily", unique_for=60.0, now=now)

    first = enqueue_at(T)
    claim = claim_one(broker, now=T + 1)
    assert broker.ack([(claim, "sent")], now=T + 2) == [True]
    assert enqueue_at(T + 59) == first
    second = enqueue_at(T + 61)
    assert second != first
    assert enqueue_at(T + 120) == second  # held until T + 61 + 60
    third = enqueue_at(T + 122)
    assert third not in (first, second)


def test_a_unique_key_repeated_within_one_batch_stores_one_job(broker: Broker) -> None:
    a = envelope_for("resize_video", unique_key="video:7")
    b = envelope_for("resize_video", unique_key="video:7")
    c = envelope_for("resize_video", unique_key="video:8")
    assert broker.enqueue([a, b, c], now=T) == [a.id, a.id, c.id]
    assert broker.get(b.id) is None
    assert sorted(ids_of(claim_all(broker, now=T))) == sorted([a.id, c.id])


def test_one_unique_key_enqueued_from_many_threads_at_once_creates_one_job(
    broker: Broker,
) -> None:
    returned: list[str] = []
    lock = Lock()

    def producer(connection: Broker) -> Callable[[], None]:
        def run() -> None:
            for _ in range(10):
                job_id = enqueue_one(connection, unique_key="logs:edge-1:2033-05-18", now=T)
                with lock:
                    returned.append(job_id)

        return run

    with second_connection(broker) as other:
        run_threads([producer(conn) for conn in [broker, other] * 4])
    assert len(returned) == 80
    assert len(set(returned)) == 1
    assert ids_of(broker.jobs(JobQuery())) == returned[:1]


# -- single-fire schedule ticks ----------------------------------------------------------------


def test_fire_once_grants_each_tick_to_exactly_one_caller(broker: Broker) -> None:
    assert broker.last_fired("invoices") is None
    assert [broker.fire_once("invoices", T) for _ in range(3)] == [True, False, False]
    assert broker.last_fired("invoices") == T
    assert [broker.fire_once("invoices", T + 60) for _ in range(2)] == [True, False]
    assert broker.fire_once("reports", T + 60) is True  # each schedule has its own ticks
    assert broker.last_fired("invoices") == T + 60
    assert broker.last_fired("reports") == T + 60


def test_fire_once_grants_each_tick_to_one_of_many_threads_on_two_connections(
    broker: Broker,
) -> None:
    ticks = [T + 60 * n for n in range(25)]
    wins: Counter[float] = Counter()
    lock = Lock()

    def scheduler(connection: Broker) -> Callable[[], None]:
        def run() -> None:
            for tick in ticks:
                if connection.fire_once("invoices", tick):
                    with lock:
                        wins[tick] += 1

        return run

    with second_connection(broker) as other:
        run_threads([scheduler(conn) for conn in [broker, other] * 4])
        assert other.last_fired("invoices") == ticks[-1]
    assert wins == Counter({tick: 1 for tick in ticks})
    assert broker.last_fired("invoices") == ticks[-1]


# -- pruning -----------------------------------------------------------------------------------


def test_prune_forgets_jobs_in_the_given_final_states_that_finished_before_the_cutoff(
    broker: Broker,
) -> None:
    old_success = job_in_state(broker, State.SUCCEEDED, at=T + 1)
    old_dead = job_in_state(broker, State.DEAD, at=T + 2)
    new_success = job_in_state(broker, State.SUCCEEDED, at=T + 10)
    live = job_in_state(broker, State.QUEUED, at=T + 1)
    running = job_in_state(broker, State.RUNNING, at=T + 1)
    assert broker.prune(T + 5, [State.SUCCEEDED]) == 1
    assert broker.get(old_success) is None
    assert [state_of(broker, j) for j in (old_dead, new_success)] == [State.DEAD, State.SUCCEEDED]
    assert broker.prune(T + 5, [State.SUCCEEDED, State.DEAD]) == 1
    assert broker.get(old_dead) is None
    assert broker.prune(T + 1000, sorted(FINAL_STATES)) == 1
    assert broker.get(new_success) is None
    assert [state_of(broker, j) for j in (live, running)] == [State.QUEUED, State.RUNNING]
    # Counts of final states are totals since the last purge: pruning does not rewrite history.
    counts = broker.stats().jobs["resize_video"].counts
    assert (counts.get("succeeded"), counts.get("dead")) == (2, 1)


def test_prune_removes_at_most_its_limit(broker: Broker) -> None:
    ids = [job_in_state(broker, State.CANCELLED, at=T + n) for n in range(3)]
    assert broker.prune(T + 100, [State.CANCELLED], limit=2) == 2
    assert broker.prune(T + 100, [State.CANCELLED], limit=2) == 1
    assert broker.get_many(ids) == [None] * 3
