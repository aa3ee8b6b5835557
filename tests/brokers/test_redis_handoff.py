"""Redis hands a job enqueued into an idle worker straight to it: a claim with `offer=True`
that finds too little leaves an offer, the next enqueue into one of its queues claims the job
for that worker and pushes it to the worker's inbox, and `wait_for_work(..., worker_id)`
returns it already claimed. These tests hold that path to the promises of a normal claim
(lease, attempts, counts, listings, acks, expiry, pauses) and check that a worker that never
takes its jobs, or stops, loses none. A real redis-server on loopback (the session's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest
import redis

from backroom.brokers import JobQuery, connect
from backroom.brokers.redis import OFFER_S, RedisBroker
from backroom.envelope import State
from tests.helpers import envelope_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

T = 2_000_000_000.0


@pytest.fixture
def broker(redis_server: str) -> Iterator[RedisBroker]:
    with closing(connect(redis_server + "?prefix=handoff")) as opened:
        assert isinstance(opened, RedisBroker)
        opened.purge()
        yield opened
        opened.purge()


def _inbox(broker: RedisBroker, worker: str) -> list[bytes]:
    """What waits in a worker's inbox: b"" is a wake-up, anything else jobs handed over."""
    client = redis.Redis.from_url(broker.url.split("?")[0])
    return list(client.lrange("{" + broker.prefix + "}:i:" + worker, 0, -1))


def _offer(broker: RedisBroker, worker: str = "w1", limit: int = 4, now: float = T) -> None:
    assert broker.claim(["default"], worker, 30, limit, now=now, offer=True) == []


def test_a_job_enqueued_into_an_idle_worker_reaches_its_wait_already_claimed(
    broker: RedisBroker,
) -> None:
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video", tags=("acme",))], now=T + 1)[0]
    handed = broker.wait_for_work(["default"], 1.0, "w1")
    assert [claim.id for claim in handed] == [job_id]
    claim = handed[0]
    assert claim.envelope.attempt == 1
    assert claim.lease_until == T + 1 + OFFER_S  # until the worker renews it on receipt
    record = broker.get(job_id)
    assert record is not None
    assert (record.state, record.attempts, record.worker_id) == (State.RUNNING, 1, "w1")
    assert broker.stats().jobs["resize_video"].counts == {"running": 1}
    assert [r.id for r in broker.jobs(JobQuery(state=State.RUNNING))] == [job_id]
    assert [r.id for r in broker.jobs(JobQuery(tag="acme"))] == [job_id]
    # nothing is left for anyone else to claim, and the lease is the worker's own
    assert broker.claim(["default"], "w2", 30, 10, now=T + 2) == []
    assert broker.extend(handed, 30, now=T + 3) == {job_id}
    assert broker.ack([(claim, "done")], now=T + 4) == [True]
    finished = broker.get(job_id)
    assert finished is not None and finished.state == State.SUCCEEDED


def test_a_worker_with_jobs_in_its_inbox_gets_no_new_offer_until_it_took_them(
    broker: RedisBroker,
) -> None:
    # it claims (and offers) again before it waits: the job handed for the last offer may
    # already sit in its inbox, and a second offer would take more than it has room for
    _offer(broker, limit=1)
    first = broker.enqueue([envelope_for("resize_video")], now=T + 1)[0]
    _offer(broker, limit=1, now=T + 2)
    second = broker.enqueue([envelope_for("resize_video")], now=T + 3)[0]
    assert broker.get(second).state == State.QUEUED  # type: ignore[union-attr]
    assert [c.id for c in broker.wait_for_work(["default"], 1.0, "w1")] == [first]
    assert _inbox(broker, "w1") == []
    claimed = broker.claim(["default"], "w1", 30, 2, now=T + 4, offer=True)
    assert [c.id for c in claimed] == [second]  # and, its inbox empty, it offers again
    third = broker.enqueue([envelope_for("resize_video")], now=T + 5)[0]
    assert broker.get(third).state == State.RUNNING  # type: ignore[union-attr]


def test_an_offer_takes_as_many_jobs_as_the_claim_lacked_and_the_rest_wait_queued(
    broker: RedisBroker,
) -> None:
    broker.enqueue([envelope_for("resize_video")], now=T)
    assert len(broker.claim(["default"], "w1", 30, 3, now=T, offer=True)) == 1  # offers 2
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(5)], now=T + 1)
    handed = broker.wait_for_work(["default"], 1.0, "w1")
    assert [claim.id for claim in handed] == ids[:2]  # the oldest, in order
    assert broker.stats().jobs["resize_video"].counts == {"running": 3, "queued": 3}
    assert [c.id for c in broker.claim(["default"], "w2", 30, 10, now=T + 2)] == ids[2:]


def test_an_offer_serves_once_and_a_claim_that_fills_up_takes_it_back(
    broker: RedisBroker,
) -> None:
    _offer(broker, limit=1)
    first = broker.enqueue([envelope_for("resize_video")], now=T + 1)[0]
    second = broker.enqueue([envelope_for("resize_video")], now=T + 1)[0]
    assert [c.id for c in broker.wait_for_work(["default"], 1.0, "w1")] == [first]
    record = broker.get(second)
    assert record is not None and record.state == State.QUEUED  # the offer was used up
    assert [c.id for c in broker.claim(["default"], "w2", 30, 5, now=T + 2)] == [second]
    # an offer out, then a claim (of another queue here) that takes all it asked for: the
    # offer is gone, the next job waits in its queue
    _offer(broker, limit=1, now=T + 2)
    broker.enqueue([envelope_for("resize_video", queue="media")], now=T + 2)
    assert len(broker.claim(["media"], "w1", 30, 1, now=T + 3, offer=True)) == 1
    third = broker.enqueue([envelope_for("resize_video")], now=T + 3)[0]
    record = broker.get(third)
    assert record is not None and record.state == State.QUEUED


def test_an_offer_older_than_its_time_gets_nothing(broker: RedisBroker) -> None:
    """A worker that died with an offer out is offered jobs for OFFER_S at most."""
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video")], now=T + OFFER_S + 1)[0]
    record = broker.get(job_id)
    assert record is not None and record.state == State.QUEUED


def test_a_job_handed_to_a_worker_that_never_takes_it_goes_back_uncounted_soon(
    broker: RedisBroker,
) -> None:
    """The worker died with its offer out: the job it never received is not a lost run (no
    recovery, no attempt used up, even with no retries left), and it is back in OFFER_S."""
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video", max_retries=0)], now=T + 1)[0]
    assert broker.sweep_expired(now=T + 1 + OFFER_S + 0.1) == []  # not a recovery
    record = broker.get(job_id)
    assert record is not None and (record.state, record.attempts) == (State.QUEUED, 0)
    assert broker.stats().jobs["resize_video"].recoveries == 0
    again = broker.claim(["default"], "w2", 30, 10, now=T + 10)
    assert [(c.id, c.envelope.attempt) for c in again] == [(job_id, 1)]


def test_a_job_handed_over_and_received_is_recovered_like_any_other_when_its_worker_dies(
    broker: RedisBroker,
) -> None:
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video", max_retries=1)], now=T + 1)[0]
    handed = broker.wait_for_work(["default"], 1.0, "w1")
    assert broker.extend(handed, 30, now=T + 1) == {job_id}  # received: the worker renews
    assert broker.sweep_expired(now=T + 1 + OFFER_S + 0.1) == []  # the renewed lease holds
    assert broker.sweep_expired(now=T + 1 + 31) == [job_id]  # then the worker dies
    assert broker.stats().jobs["resize_video"].recoveries == 1
    again = broker.claim(["default"], "w2", 30, 10, now=T + 40)
    assert [(c.id, c.envelope.attempt) for c in again] == [(job_id, 2)]


def test_a_stopping_worker_withdraws_its_offer_and_gets_back_what_it_never_received(
    broker: RedisBroker,
) -> None:
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video")], now=T + 1)[0]
    unreceived = broker.withdraw("w1")
    assert [c.id for c in unreceived] == [job_id]
    assert broker.release(unreceived, now=T + 2) == 1
    record = broker.get(job_id)
    assert record is not None and (record.state, record.attempts) == (State.QUEUED, 0)
    assert broker.wait_for_work(["default"], 0.05, "w1") == []  # the inbox is empty
    later = broker.enqueue([envelope_for("resize_video")], now=T + 3)[0]
    record = broker.get(later)
    assert record is not None and record.state == State.QUEUED  # no offer any more


def test_a_paused_queue_hands_nothing_over_and_its_resume_wakes_the_waiting_worker(
    broker: RedisBroker,
) -> None:
    broker.pause("default")
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video")], now=T + 1)[0]
    record = broker.get(job_id)
    assert record is not None and record.state == State.QUEUED
    broker.resume("default")
    # a wake-up waits in its inbox (a wait would end after MAX_BLOCK_S even without one)
    assert _inbox(broker, "w1") == [b""]
    assert broker.wait_for_work(["default"], 30.0, "w1") == []  # a wake-up, no jobs
    assert [c.id for c in broker.claim(["default"], "w1", 30, 4, now=T + 2)] == [job_id]


def test_a_job_queued_again_wakes_a_worker_with_an_offer(broker: RedisBroker) -> None:
    broker.enqueue([envelope_for("resize_video")], now=T)
    claim = broker.claim(["default"], "w1", 30, 1, now=T)[0]
    _offer(broker, worker="w2", now=T + 1)
    assert broker.release([claim], now=T + 2) == 1
    assert _inbox(broker, "w2") == [b""]
    assert broker.wait_for_work(["default"], 5.0, "w2") == []  # a wake-up: claim again
    assert [c.id for c in broker.claim(["default"], "w2", 30, 4, now=T + 3)] == [claim.id]


def test_a_job_past_its_expiry_when_handed_over_ends_expired_and_the_worker_is_woken(
    broker: RedisBroker,
) -> None:
    _offer(broker)
    job_id = broker.enqueue([envelope_for("resize_video", expires=T)], now=T + 1)[0]
    assert _inbox(broker, "w1") == [b""]  # its offer is used: it must claim again
    assert broker.wait_for_work(["default"], 1.0, "w1") == []
    record = broker.get(job_id)
    assert record is not None and (record.state, record.reason) == (State.CANCELLED, "expired")
    assert broker.stats().jobs["resize_video"].counts == {"cancelled": 1}


def test_each_idle_worker_gets_its_own_job_instead_of_all_waking_for_one(
    broker: RedisBroker, redis_server: str
) -> None:
    for worker in ("w1", "w2", "w3"):
        _offer(broker, worker=worker, limit=1)
    ids = broker.enqueue([envelope_for("resize_video") for _ in range(3)], now=T + 1)
    got = {w: [c.id for c in broker.wait_for_work(["default"], 1.0, w)] for w in ("w1", "w2", "w3")}
    assert sorted(i for handed in got.values() for i in handed) == sorted(ids)
    assert all(len(handed) == 1 for handed in got.values())
    assert redis.Redis.from_url(redis_server).hlen("{handoff}:o") == 0  # each served once
