"""The Broker contract, part 1: enqueue, claim, leases, outcomes, cancel, retry, delete, release,
progress and claims racing over two connections. Every test runs unchanged on memory, sqlite and
redis through the `broker` fixture; time moves through `now=`, never by sleeping.
The helpers at the top are shared by the other test_conformance_*.py modules."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from typing import Any

import pytest

from backroom.brokers import Broker, Claim, Failure, JobQuery, JobRecord, connect
from backroom.envelope import State
from backroom.errors import BackroomError
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(30)

# A fixed instant (2033-05-18) far from the wall clock. Every call passes `now=`, so a broker
# that reads its own clock where the contract hands it `now` fails here instead of passing by luck.
T = 2_000_000_000.0
LEASE_S = 30.0
FAILURE = Failure("ValueError", "month 13 does not exist", "Traceback ...\nValueError: month 13\n")

_solo = itertools.count()


# -- helpers shared by every conformance module ----------------------------------------------


def enqueue_one(broker: Broker, job: str = "resize_video", now: float = T, **fields: Any) -> str:
    """Enqueue one envelope for `job` (fields as envelope_for takes them); returns its id."""
    [job_id] = broker.enqueue([envelope_for(job, **fields)], now=now)
    return job_id


def claim_one(
    broker: Broker,
    queues: Sequence[str] = ("default",),
    worker_id: str = "w1",
    lease_s: float = LEASE_S,
    now: float = T,
) -> Claim:
    """Claim exactly one job; fails the test when there is none."""
    claims = broker.claim(list(queues), worker_id=worker_id, lease_s=lease_s, limit=1, now=now)
    assert len(claims) == 1, f"expected one claimable job in {list(queues)}, got {len(claims)}"
    return claims[0]


def claim_all(
    broker: Broker, queues: Sequence[str] = ("default",), worker_id: str = "w1", now: float = T
) -> list[Claim]:
    return broker.claim(list(queues), worker_id=worker_id, lease_s=LEASE_S, limit=100, now=now)


def record_of(broker: Broker, job_id: str) -> JobRecord:
    record = broker.get(job_id)
    assert record is not None, f"job {job_id} is unknown to the broker"
    return record


def state_of(broker: Broker, job_id: str) -> State | None:
    record = broker.get(job_id)
    return None if record is None else record.state


def ids_of(items: Sequence[Claim] | Sequence[JobRecord]) -> list[str]:
    return [item.id for item in items]


def job_in_state(
    broker: Broker, state: State, job: str = "resize_video", at: float = T, **fields: Any
) -> str:
    """A new job brought to `state` at time `at`. It lives on a queue of its own unless `queue` is
    given, so claiming it never picks up another test job on the way."""
    queue = fields.setdefault("queue", f"solo-{next(_solo)}")
    if state == State.SCHEDULED:
        fields.setdefault("eta", at + 3600)
    job_id = enqueue_one(broker, job, now=at, **fields)
    if state == State.CANCELLED:
        assert broker.cancel(job_id, now=at) is True
    elif state not in (State.SCHEDULED, State.QUEUED):
        claim = claim_one(broker, [queue], now=at)
        assert claim.id == job_id
        if state == State.SUCCEEDED:
            assert broker.ack([(claim, {"done": True})], now=at) == [True]
        elif state == State.RETRYING:
            assert broker.nack(claim, FAILURE, retry_at=at + 3600, now=at) is True
        elif state == State.DEAD:
            assert broker.nack(claim, FAILURE, retry_at=None, now=at) is True
        elif state == State.REJECTED:
            assert broker.reject(claim, "unknown job 'resize_video'", now=at) is True
    assert state_of(broker, job_id) == state
    return job_id


@contextmanager
def second_connection(broker: Broker) -> Iterator[Broker]:
    """Another connection to the same store (the same SQLite file, the same Redis). memory:// is
    one private store per connection, so there the threads share the one connection it has."""
    if broker.url.startswith("memory:"):
        yield broker
        return
    with closing(connect(broker.url)) as other:
        yield other


def run_threads(targets: Sequence[Callable[[], None]], deadline_s: float = 20.0) -> None:
    """Start every target at once (behind a barrier), join them, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=deadline_s)
            target()
        except BaseException as exc:  # reported in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=deadline_s)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]


# -- enqueue -----------------------------------------------------------------------------------


def test_enqueue_returns_the_ids_in_the_order_given_and_keeps_each_envelope(
    broker: Broker,
) -> None:
    envelopes = [
        envelope_for(
            "resize_video",
            tags=("edge-1", "hd"),
            priority=3,
            queue="media",
            max_retries=5,
            timeout=12.5,
            unique_key="video:7",
        ),
        envelope_for("send_email", payload={"to": "ada@example.com", "n": [1, 2.5, None]}),
        envelope_for("resize_video", source="job:ingest", then="notify"),
    ]
    ids = broker.enqueue(envelopes, now=T)
    assert ids == [envelope.id for envelope in envelopes]
    for envelope, record in zip(envelopes, broker.get_many(ids), strict=True):
        assert record is not None
        assert record.state == State.QUEUED
        assert record.attempts == 0
        assert record.envelope == envelope


def test_enqueue_of_a_batch_is_all_or_none_when_one_id_is_already_stored(broker: Broker) -> None:
    existing = envelope_for("resize_video")
    broker.enqueue([existing], now=T)
    fresh = envelope_for("resize_video")
    clash = envelope_for("send_email", id=existing.id)
    with pytest.raises(BackroomError):
        broker.enqueue([fresh, clash], now=T)
    assert broker.get(fresh.id) is None
    assert record_of(broker, existing.id).job == "resize_video"
    assert ids_of(broker.jobs(JobQuery())) == [existing.id]
    assert ids_of(claim_all(broker)) == [existing.id]


def test_enqueue_of_a_batch_is_all_or_none_when_one_envelope_cannot_be_encoded(
    broker: Broker,
) -> None:
    good = envelope_for("resize_video")
    bad = envelope_for("resize_video", payload={"when": object()})
    with pytest.raises((TypeError, BackroomError)):
        broker.enqueue([good, bad], now=T)
    assert broker.get(good.id) is None
    assert broker.jobs(JobQuery()) == []
    assert claim_all(broker) == []


# -- claim -------------------------------------------------------------------------------------


def test_claim_makes_the_job_running_under_a_lease_for_that_worker(broker: Broker) -> None:
    job_id = enqueue_one(broker, now=T)
    claim = claim_one(broker, worker_id="w1", lease_s=30, now=T + 2)
    assert claim.id == job_id
    assert claim.envelope.attempt == 1
    assert claim.lease_until == pytest.approx(T + 32)
    record = record_of(broker, job_id)
    assert record.state == State.RUNNING
    assert record.attempts == 1
    assert record.worker_id == "w1"
    assert record.queued_at == pytest.approx(T)
    assert record.started_at == pytest.approx(T + 2)


def test_claim_serves_queues_in_the_order_given(broker: Broker) -> None:
    low = [enqueue_one(broker, queue="low") for _ in range(2)]
    high = [enqueue_one(broker, queue="high") for _ in range(2)]
    first = broker.claim(["high", "low"], worker_id="w1", lease_s=LEASE_S, limit=3, now=T)
    assert set(ids_of(first)) == {*high, low[0]}
    assert ids_of(claim_all(broker, ["high", "low"])) == [low[1]]


def test_claim_takes_higher_priority_first_then_oldest_first(broker: Broker) -> None:
    a = enqueue_one(broker, priority=0)
    b = enqueue_one(broker, priority=5)
    c = enqueue_one(broker, priority=0)
    d = enqueue_one(broker, priority=5)
    e = enqueue_one(broker, priority=-1)
    order = [claim_one(broker).id for _ in range(5)]
    assert order == [b, d, a, c, e]


def test_claim_is_first_in_first_out_within_one_priority(broker: Broker) -> None:
    batch = broker.enqueue([envelope_for("resize_video") for _ in range(10)], now=T)
    later = enqueue_one(broker, now=T + 1)
    order = [claim_one(broker, now=T + 2).id for _ in range(11)]
    assert order == [*batch, later]


def test_claim_returns_no_more_than_its_limit(broker: Broker) -> None:
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(5)], now=T)
    first = broker.claim(["default"], worker_id="w1", lease_s=LEASE_S, limit=2, now=T)
    rest = broker.claim(["default"], worker_id="w1", lease_s=LEASE_S, limit=10, now=T)
    assert len(first) == 2
    assert len(rest) == 3
    assert sorted(ids_of(first) + ids_of(rest)) == sorted(ids)
    assert claim_all(broker) == []


def test_claim_from_an_empty_or_unknown_queue_returns_nothing(broker: Broker) -> None:
    enqueue_one(broker, queue="media")
    assert claim_all(broker, ["default"]) == []
    assert claim_all(broker, ["no-such-queue"]) == []


def test_a_claimed_job_is_not_claimed_again_while_its_lease_holds(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    assert claim_one(broker, worker_id="w1", lease_s=LEASE_S, now=T).id == job_id
    assert claim_all(broker, worker_id="w2", now=T + 1) == []
    assert claim_all(broker, worker_id="w2", now=T + LEASE_S - 1) == []


def test_each_claim_of_a_job_counts_one_more_attempt_with_a_new_attempt_id(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    first = claim_one(broker, now=T)
    assert broker.nack(first, FAILURE, retry_at=T + 10, now=T + 1) is True
    assert broker.promote_due(now=T + 10) == 1
    second = claim_one(broker, now=T + 11)
    assert (first.id, second.id) == (job_id, job_id)
    assert (first.envelope.attempt, second.envelope.attempt) == (1, 2)
    assert second.attempt_id != first.attempt_id
    assert record_of(broker, job_id).attempts == 2


# -- leases ------------------------------------------------------------------------------------


def test_a_worker_that_lost_its_lease_cannot_record_an_outcome(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video")], now=T)
    [stale] = broker.claim(["default"], worker_id="w1", lease_s=5, limit=1, now=T)
    broker.sweep_expired(now=stale.lease_until + 1, limit=10)
    [fresh] = broker.claim(
        ["default"], worker_id="w2", lease_s=60, limit=1, now=stale.lease_until + 1
    )
    later = stale.lease_until + 2
    assert broker.ack([(stale, {"frames": 1})], now=later) == [False]
    assert broker.nack(stale, FAILURE, retry_at=None, now=later) is False
    assert broker.nack(stale, FAILURE, retry_at=later + 10, now=later) is False
    assert broker.reject(stale, "bad signature", now=later) is False
    assert broker.finish_cancelled(stale, "cancelled", now=later) is False
    assert broker.extend([stale], 60, now=later) == set()
    assert broker.progress(stale, 0.5, "half", now=later) is False
    assert broker.release([stale], now=later) == 0
    record = record_of(broker, fresh.id)
    assert (record.state, record.worker_id, record.progress) == (State.RUNNING, "w2", None)
    assert broker.ack([(fresh, {"frames": 2})], now=later) == [True]
    assert record_of(broker, fresh.id).result == {"frames": 2}


def test_sweep_requeues_a_job_whose_lease_ran_out_and_counts_a_recovery(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    claim_one(broker, lease_s=10, now=T)
    assert broker.sweep_expired(now=T + 9, limit=10) == []
    assert state_of(broker, job_id) == State.RUNNING
    assert broker.sweep_expired(now=T + 11, limit=10) == [job_id]
    record = record_of(broker, job_id)
    assert (record.state, record.attempts) == (State.QUEUED, 1)
    assert broker.stats().jobs["resize_video"].recoveries == 1
    again = claim_one(broker, worker_id="w2", now=T + 12)
    assert (again.id, again.envelope.attempt) == (job_id, 2)


def test_sweep_after_the_last_attempt_makes_the_job_dead_with_lease_expired(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker, max_retries=1)
    claim_one(broker, lease_s=10, now=T)
    broker.sweep_expired(now=T + 11, limit=10)
    assert state_of(broker, job_id) == State.QUEUED  # one retry was left
    claim_one(broker, lease_s=10, now=T + 12)
    broker.sweep_expired(now=T + 23, limit=10)
    record = record_of(broker, job_id)
    assert record.state == State.DEAD
    assert record.error is not None
    assert record.error.type == "LeaseExpired"
    assert record.finished_at == pytest.approx(T + 23)
    assert claim_all(broker, now=T + 24) == []


def test_extend_keeps_the_lease_so_the_sweep_leaves_the_job_running(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, lease_s=10, now=T)
    assert broker.extend([claim], 30, now=T + 8) == {job_id}
    assert broker.sweep_expired(now=T + 15, limit=10) == []
    assert state_of(broker, job_id) == State.RUNNING
    assert broker.ack([(claim, "done")], now=T + 20) == [True]


def test_extend_returns_only_the_ids_still_leased_to_these_claims(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video") for _ in range(3)], now=T)
    finished, lost, kept = broker.claim(["default"], "w1", lease_s=10, limit=3, now=T)
    assert broker.ack([(finished, None)], now=T + 1) == [True]
    assert broker.extend([kept], 60, now=T + 5) == {kept.id}
    assert broker.sweep_expired(now=T + 11, limit=10) == [lost.id]
    assert broker.extend([finished, lost, kept], 60, now=T + 12) == {kept.id}


# -- outcomes ----------------------------------------------------------------------------------


def test_ack_stores_the_result_and_marks_the_job_succeeded(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T + 1)
    result = {"sent": 120, "ids": [1, 2], "note": "ok", "ratio": 0.5, "nothing": None}
    assert broker.ack([(claim, result)], now=T + 4) == [True]
    record = record_of(broker, job_id)
    assert record.state == State.SUCCEEDED
    assert record.result == result
    assert record.error is None
    assert record.finished_at == pytest.approx(T + 4)
    # A finished job cannot be finished again by the same claim.
    assert broker.ack([(claim, {"sent": 0})], now=T + 5) == [False]
    assert broker.nack(claim, FAILURE, retry_at=None, now=T + 5) is False
    assert broker.reject(claim, "late", now=T + 5) is False
    record = record_of(broker, job_id)
    assert (record.state, record.result) == (State.SUCCEEDED, result)


def test_ack_of_a_batch_reports_each_outcome_in_order(broker: Broker) -> None:
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(3)], now=T)
    first, second, third = broker.claim(["default"], "w1", LEASE_S, limit=3, now=T)
    assert broker.ack([(second, "early")], now=T + 1) == [True]
    outcomes = broker.ack([(first, "a"), (second, "b"), (third, None)], now=T + 2)
    assert outcomes == [True, False, True]
    results = {record.id: record.result for record in broker.get_many(ids) if record}
    assert results == {first.id: "a", second.id: "early", third.id: None}
    assert {state_of(broker, job_id) for job_id in ids} == {State.SUCCEEDED}


def test_a_claim_takes_up_to_its_limit_however_large(broker: Broker) -> None:
    # 9,000 fresh jobs and 9,000 queued again (released) are taken in one call
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(18_000)], now=T)
    held = broker.claim(["default"], "w1", LEASE_S, limit=9_000, now=T)
    assert broker.release(held, now=T + 1) == 9_000
    claims = broker.claim(["default"], "w2", LEASE_S, limit=30_000, now=T + 2)
    assert sorted(c.id for c in claims) == sorted(ids)
    assert all(broker.ack([(c, None) for c in claims], now=T + 3))


def test_nack_with_a_retry_time_makes_the_job_retrying_until_promote_due_queues_it(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.nack(claim, FAILURE, retry_at=T + 30, now=T + 1) is True
    record = record_of(broker, job_id)
    assert (record.state, record.error) == (State.RETRYING, FAILURE)
    assert claim_all(broker, now=T + 2) == []
    assert broker.promote_due(now=T + 29) == 0
    assert state_of(broker, job_id) == State.RETRYING
    assert broker.promote_due(now=T + 30) == 1
    assert state_of(broker, job_id) == State.QUEUED
    again = claim_one(broker, now=T + 31)
    assert (again.id, again.envelope.attempt) == (job_id, 2)
    assert broker.stats().jobs["resize_video"].retries == 1


def test_nack_without_a_retry_time_makes_the_job_dead_keeping_the_failure(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.nack(claim, FAILURE, retry_at=None, now=T + 2) is True
    record = record_of(broker, job_id)
    assert record.state == State.DEAD
    assert record.error == FAILURE
    assert (record.error.type, record.error.message, record.error.traceback) == (
        "ValueError",
        "month 13 does not exist",
        "Traceback ...\nValueError: month 13\n",
    )
    assert record.finished_at == pytest.approx(T + 2)
    assert broker.promote_due(now=T + 10_000) == 0
    assert claim_all(broker, now=T + 10_000) == []


def test_reject_ends_the_job_rejected_with_its_reason_never_claimed_and_counted(
    broker: Broker,
) -> None:
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(3)], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=3, now=T)
    reasons = ["unknown job 'resize_video'", "bad signature", "unknown job 'resize_video'"]
    for claim, reason in zip(claims, reasons, strict=True):
        assert broker.reject(claim, reason, now=T + 1) is True
    for claim, reason in zip(claims, reasons, strict=True):
        record = record_of(broker, claim.id)
        assert (record.state, record.reason) == (State.REJECTED, reason)
        assert record.finished_at == pytest.approx(T + 1)
    assert broker.promote_due(now=T + 10_000) == 0
    assert broker.sweep_expired(now=T + 10_000) == []
    assert claim_all(broker, now=T + 10_000) == []
    assert {state_of(broker, job_id) for job_id in ids} == {State.REJECTED}
    rejections = broker.stats().jobs["resize_video"].rejections
    assert dict(rejections) == {"unknown job 'resize_video'": 2, "bad signature": 1}


# -- cancel ------------------------------------------------------------------------------------


def test_a_cancelled_queued_job_never_runs(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    assert broker.cancel(job_id, reason="cancelled by api", now=T + 1) is True
    record = record_of(broker, job_id)
    assert (record.state, record.reason) == (State.CANCELLED, "cancelled by api")
    assert record.finished_at == pytest.approx(T + 1)
    assert claim_all(broker, now=T + 2) == []


def test_a_cancelled_scheduled_job_never_runs_even_after_its_eta(broker: Broker) -> None:
    job_id = enqueue_one(broker, eta=T + 60)
    assert broker.cancel(job_id, now=T + 1) is True
    assert state_of(broker, job_id) == State.CANCELLED
    assert broker.promote_due(now=T + 61) == 0
    assert claim_all(broker, now=T + 61) == []
    assert state_of(broker, job_id) == State.CANCELLED


def test_a_cancelled_retrying_job_is_not_retried(broker: Broker) -> None:
    job_id = job_in_state(broker, State.RETRYING, queue="default")
    assert broker.cancel(job_id, now=T + 1) is True
    assert state_of(broker, job_id) == State.CANCELLED
    assert broker.promote_due(now=T + 10_000) == 0
    assert claim_all(broker, now=T + 10_000) == []


def test_cancel_of_a_running_job_asks_its_worker_to_stop(broker: Broker) -> None:
    target = enqueue_one(broker)
    bystander = enqueue_one(broker)
    claims = {c.id: c for c in broker.claim(["default"], "w1", LEASE_S, limit=2, now=T)}
    assert set(claims) == {target, bystander}
    assert broker.cancel(target, now=T + 1) is True
    record = record_of(broker, target)
    assert (record.state, record.cancel_requested) == (State.RUNNING, True)
    assert broker.cancel_requested([target, bystander]) == {target}
    assert broker.finish_cancelled(claims[target], "cancelled by api", now=T + 2) is True
    record = record_of(broker, target)
    assert (record.state, record.reason) == (State.CANCELLED, "cancelled by api")
    assert record.finished_at == pytest.approx(T + 2)
    assert broker.cancel_requested([target, bystander]) == set()
    assert broker.ack([(claims[bystander], None)], now=T + 3) == [True]


def test_a_running_job_told_to_stop_is_not_run_again_when_its_lease_runs_out(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim_one(broker, lease_s=10, now=T)
    assert broker.cancel(job_id, now=T + 1) is True
    broker.sweep_expired(now=T + 11, limit=10)  # its worker died before it could stop the job
    assert state_of(broker, job_id) == State.CANCELLED
    assert claim_all(broker, now=T + 12) == []


def test_a_running_job_told_to_stop_is_not_run_again_when_its_worker_releases_it(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.cancel(job_id, now=T + 1) is True
    broker.release([claim], now=T + 2)  # a graceful shutdown before the worker saw the cancel
    assert state_of(broker, job_id) == State.CANCELLED
    assert claim_all(broker, now=T + 3) == []


def test_a_running_job_told_to_stop_is_not_retried_when_its_attempt_fails(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.cancel(job_id, reason="cancelled by api", now=T + 1) is True
    assert broker.nack(claim, FAILURE, retry_at=T + 10, now=T + 2) is True
    record = record_of(broker, job_id)
    assert (record.state, record.reason, record.error) == (
        State.CANCELLED,
        "cancelled by api",
        FAILURE,
    )
    assert broker.promote_due(now=T + 100) == 0
    assert claim_all(broker, now=T + 100) == []


def test_a_running_job_that_finishes_despite_a_cancel_keeps_its_result(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.cancel(job_id, now=T + 1) is True
    assert broker.ack([(claim, {"sent": 3})], now=T + 2) == [True]
    record = record_of(broker, job_id)
    assert (record.state, record.result, record.reason) == (State.SUCCEEDED, {"sent": 3}, None)


@pytest.mark.parametrize("final", [State.SUCCEEDED, State.DEAD, State.REJECTED, State.CANCELLED])
def test_cancel_of_a_finished_job_returns_false_and_changes_nothing(
    broker: Broker, final: State
) -> None:
    job_id = job_in_state(broker, final)
    before = record_of(broker, job_id)
    assert broker.cancel(job_id, now=T + 5) is False
    assert record_of(broker, job_id) == before


def test_cancel_of_an_unknown_job_returns_false(broker: Broker) -> None:
    assert broker.cancel("0000000000000nosuchjob0", now=T) is False
    assert broker.get("0000000000000nosuchjob0") is None


# -- retry, delete, release, progress ----------------------------------------------------------


def test_retry_puts_a_dead_job_back_in_the_queue_with_its_attempts_reset(broker: Broker) -> None:
    job_id = enqueue_one(broker, max_retries=0)
    claim = claim_one(broker, now=T)
    assert broker.nack(claim, FAILURE, retry_at=None, now=T + 1) is True
    assert broker.retry(job_id, now=T + 5) is True
    record = record_of(broker, job_id)
    assert (record.state, record.attempts) == (State.QUEUED, 0)
    again = claim_one(broker, now=T + 6)
    assert (again.id, again.envelope.attempt) == (job_id, 1)
    assert broker.ack([(again, "second time lucky")], now=T + 7) == [True]


@pytest.mark.parametrize("final", [State.REJECTED, State.CANCELLED])
def test_retry_brings_back_a_rejected_or_cancelled_job(broker: Broker, final: State) -> None:
    job_id = job_in_state(broker, final, queue="default")
    assert broker.retry(job_id, now=T + 5) is True
    assert state_of(broker, job_id) == State.QUEUED
    assert claim_one(broker, now=T + 6).id == job_id


@pytest.mark.parametrize(
    "state", [State.SCHEDULED, State.QUEUED, State.RUNNING, State.RETRYING, State.SUCCEEDED]
)
def test_retry_refuses_a_job_that_is_live_or_succeeded(broker: Broker, state: State) -> None:
    job_id = job_in_state(broker, state)
    assert broker.retry(job_id, now=T + 5) is False
    assert state_of(broker, job_id) == state


def test_retry_of_an_unknown_job_returns_false(broker: Broker) -> None:
    assert broker.retry("0000000000000nosuchjob0", now=T) is False


def test_delete_forgets_finished_jobs_only(broker: Broker) -> None:
    live = [
        job_in_state(broker, s)
        for s in (State.SCHEDULED, State.QUEUED, State.RUNNING, State.RETRYING)
    ]
    final = [
        job_in_state(broker, s)
        for s in (State.SUCCEEDED, State.DEAD, State.CANCELLED, State.REJECTED)
    ]
    assert broker.delete([*live, *final, "0000000000000nosuchjob0"]) == 4
    assert broker.get_many(final) == [None] * 4
    assert [state_of(broker, job_id) for job_id in live] == [
        State.SCHEDULED,
        State.QUEUED,
        State.RUNNING,
        State.RETRYING,
    ]
    assert broker.delete(final) == 0
    assert broker.delete([]) == 0


def test_one_ack_of_hundreds_records_each_success_and_skips_lost_leases(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video") for _ in range(450)], now=T)
    claims = broker.claim(["default"], "w1", 60, limit=450, now=T)
    assert len(claims) == 450
    lost = claims[300]
    stale = Claim(lost.envelope, lost.lease_until, "not-the-attempt-id")
    outcomes = [(c, {"n": i}) for i, c in enumerate(claims)]
    outcomes[300] = (stale, None)
    done = broker.ack(outcomes, now=T + 1)
    assert done == [True] * 300 + [False] + [True] * 149
    assert record_of(broker, claims[449].id).result == {"n": 449}
    assert state_of(broker, lost.id) == State.RUNNING
    assert broker.stats().jobs["resize_video"].counts == {"succeeded": 449, "running": 1}


def test_deleted_and_pruned_jobs_leave_the_tag_listing(broker: Broker) -> None:
    ids = [enqueue_one(broker, tags=("customer:7", "video")) for _ in range(3)]
    claims = broker.claim(["default"], "w1", 60, limit=3, now=T)
    assert broker.ack([(c, None) for c in claims], now=T + 1) == [True] * 3
    assert broker.delete([ids[0]]) == 1
    assert broker.prune(T + 2, [State.SUCCEEDED]) == 2
    kept = enqueue_one(broker, tags=("video",))
    for tag in ("customer:7", "video"):
        listed = [r.id for r in broker.jobs(JobQuery(tag=tag))]
        assert listed == ([kept] if tag == "video" else [])


def test_release_hands_a_running_job_back_at_once_without_counting_the_attempt(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.release([claim], now=T + 1) == 1
    record = record_of(broker, job_id)
    assert (record.state, record.attempts) == (State.QUEUED, 0)
    assert broker.release([claim], now=T + 2) == 0
    assert broker.ack([(claim, "stale")], now=T + 2) == [False]
    again = claim_one(broker, worker_id="w2", now=T + 3)
    assert (again.id, again.envelope.attempt) == (job_id, 1)


def test_release_counts_only_the_claims_still_ours(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video") for _ in range(3)], now=T)
    done, kept_a, kept_b = broker.claim(["default"], "w1", LEASE_S, limit=3, now=T)
    assert broker.ack([(done, None)], now=T + 1) == [True]
    assert broker.release([done, kept_a, kept_b], now=T + 2) == 2
    assert {claim.id for claim in claim_all(broker, now=T + 3)} == {kept_a.id, kept_b.id}


def test_progress_of_a_running_job_is_stored_and_visible(broker: Broker) -> None:
    job_id = enqueue_one(broker)
    claim = claim_one(broker, now=T)
    assert broker.progress(claim, 0.25, "a quarter of the customers", now=T + 1) is True
    record = record_of(broker, job_id)
    assert (record.progress, record.progress_message) == (0.25, "a quarter of the customers")
    assert broker.progress(claim, 0.5, None, now=T + 2) is True
    record = record_of(broker, job_id)
    assert (record.progress, record.progress_message) == (0.5, None)
    assert record.state == State.RUNNING


# -- concurrency -------------------------------------------------------------------------------


def test_two_connections_claiming_at_once_never_both_get_one_job(broker: Broker) -> None:
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(300)], now=T)
    claimed: list[Claim] = []
    lock = threading.Lock()

    def drain(connection: Broker, worker_id: str) -> Callable[[], None]:
        def run() -> None:
            while batch := connection.claim(["default"], worker_id, LEASE_S, limit=7, now=T):
                with lock:
                    claimed.extend(batch)

        return run

    with second_connection(broker) as other:
        run_threads([drain(conn, f"w{i}") for i, conn in enumerate([broker, other] * 3)])
    assert len(claimed) == len(ids)
    assert sorted(ids_of(claimed)) == sorted(ids)  # each job exactly once
    assert len({claim.attempt_id for claim in claimed}) == len(ids)
    assert {state_of(broker, job_id) for job_id in ids} == {State.RUNNING}
