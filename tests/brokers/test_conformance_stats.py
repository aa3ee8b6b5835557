"""The Broker contract, part 4: the numbers kept in the broker besides the per-job counters. Per
tag (outcomes, retries, job names, run- and wait-time histograms, jobs running now, at most
MAX_TAGS tags), per job name and
minute (the timeline, at most TIMELINE_KEEP_S back), failures grouped by exception type, counts
per queue. Every test runs unchanged on memory, sqlite and redis; time moves through `now=`."""

from __future__ import annotations

import pytest

from backroom.brokers import Broker, Failure
from backroom.brokers.base import (
    FAILURE_MESSAGE_CHARS,
    MAX_FAILURE_GROUPS,
    MAX_TAGS,
    TIMELINE_KEEP_S,
    TagStats,
    TimelinePoint,
)
from backroom.envelope import State
from tests.brokers.test_conformance import (
    FAILURE,
    LEASE_S,
    T,
    claim_all,
    claim_one,
    enqueue_one,
    job_in_state,
    state_of,
)
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(60)

M = (T // 60 + 1) * 60  # the start of a minute, shortly after T


def tag(broker: Broker, name: str) -> TagStats:
    tags = broker.stats(tags=True).tags
    assert name in tags, f"no numbers for tag {name!r}; the broker has {sorted(tags)}"
    return tags[name]


def points(broker: Broker, since: float, now: float) -> dict[tuple[str, float], TimelinePoint]:
    return {(p.job, p.at): p for p in broker.timeline(since, now=now)}


# -- per tag -----------------------------------------------------------------------------------


def test_tags_count_every_outcome_of_the_jobs_carrying_them(broker: Broker) -> None:
    job_in_state(broker, State.SUCCEEDED, "resize_video", tags=("edge-1", "vip"))
    job_in_state(broker, State.SUCCEEDED, "send_email", tags=("edge-1",))
    job_in_state(broker, State.DEAD, "resize_video", tags=("edge-1",))
    job_in_state(broker, State.REJECTED, "resize_video", tags=("edge-1",))
    job_in_state(broker, State.CANCELLED, "resize_video", tags=("edge-1",))  # never ran
    job_in_state(broker, State.RETRYING, "resize_video", tags=("edge-1",))
    job_in_state(broker, State.QUEUED, "resize_video", tags=("edge-1", "queued-only"))
    running = job_in_state(broker, State.RUNNING, "send_email", tags=("edge-1",))
    broker.cancel(running, now=T)  # asked to stop: it ends when its worker says so
    edge = tag(broker, "edge-1")
    assert dict(edge.counts) == {"succeeded": 2, "dead": 1, "rejected": 1, "cancelled": 1}
    assert edge.retries == 1
    assert dict(edge.jobs) == {"resize_video": 4, "send_email": 1}
    assert dict(tag(broker, "vip").counts) == {"succeeded": 1}
    assert "queued-only" not in broker.stats(tags=True).tags  # nothing happened to it yet
    assert broker.stats().tags == {}  # read only when asked for


def test_tags_keep_a_run_time_histogram_of_every_attempt(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video", tags=("edge-1",)) for _ in range(10)], now=T)
    broker.enqueue([envelope_for("send_email", tags=("edge-2",))], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=11, now=T)
    videos = [c for c in claims if c.envelope.job == "resize_video"]
    for run_s, claim in enumerate(videos[:9], start=1):  # runs of 1 ... 9 s
        assert broker.ack([(claim, None)], now=T + run_s) == [True]
    assert broker.nack(videos[9], FAILURE, retry_at=None, now=T + 10) is True  # a 10 s failure
    run = tag(broker, "edge-1").run_time
    assert run.count == 10
    assert (run.total, run.max) == pytest.approx((55.0, 10.0))
    p50, p95 = run.quantile(0.5), run.quantile(0.95)
    assert p50 is not None and 5.0 <= p50 <= 6.25  # the bucket holding the 5th sample
    assert p95 is not None and 9.0 <= p95 <= 10.0
    edge = tag(broker, "edge-2")  # claimed, not finished: running, no outcome or run time yet
    assert (dict(edge.counts), edge.running, edge.run_time.count) == ({}, 1, 0)


def test_tags_keep_a_wait_time_histogram_sampled_when_jobs_are_claimed(broker: Broker) -> None:
    for waited_s in range(1, 11):  # enqueued 1 ... 10 s before the claim
        broker.enqueue([envelope_for("resize_video", tags=("edge-1",))], now=T - waited_s)
    broker.enqueue([envelope_for("send_email", tags=("edge-2",))], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=11, now=T)  # one batch
    assert len(claims) == 11
    wait = tag(broker, "edge-1").wait_time
    assert wait.count == 10
    assert (wait.total, wait.max) == pytest.approx((55.0, 10.0))
    p50 = wait.quantile(0.5)
    assert p50 is not None and 5.0 <= p50 <= 6.25  # the bucket holding the 5th sample
    assert (tag(broker, "edge-2").wait_time.count, tag(broker, "edge-2").wait_time.max) == (1, 0.0)
    assert tag(broker, "edge-1").run_time.count == 0  # claimed, none finished
    # a retried attempt waits again, from when its retry came due
    [email] = [c for c in claims if c.envelope.job == "send_email"]
    assert broker.nack(email, FAILURE, retry_at=T + 5, now=T + 1) is True
    assert broker.promote_due(now=T + 10) == 1
    assert claim_one(broker, now=T + 12).id == email.id
    again = tag(broker, "edge-2").wait_time
    assert (again.count, again.total, again.max) == (2, pytest.approx(7.0), pytest.approx(7.0))


def running_by_tag(broker: Broker) -> dict[str, int]:
    return {name: t.running for name, t in broker.stats(tags=True).tags.items()}


def test_running_per_tag_counts_each_claimed_job_until_it_leaves_running_any_way(
    broker: Broker,
) -> None:
    ways = ("ack", "retry", "dead", "cancelled-on-failure", "reject", "finish-cancelled",
            "release", "release-cancelled", "lost-requeued", "lost-dead",
            "lost-cancelled")  # fmt: skip
    ids = {
        way: enqueue_one(broker, tags=("walk", way), max_retries=0 if way == "lost-dead" else 3)
        for way in ways
    }
    claimed = {c.id: c for c in broker.claim(["default"], "w1", LEASE_S, limit=100, now=T)}
    claims = {way: claimed[ids[way]] for way in ways}
    assert running_by_tag(broker) == {"walk": len(ways), **dict.fromkeys(ways, 1)}
    for way in ("cancelled-on-failure", "release-cancelled", "lost-cancelled"):
        assert broker.cancel(ids[way], now=T) is True  # asked to stop: still running
    assert running_by_tag(broker)["walk"] == len(ways)

    assert broker.ack([(claims["ack"], None)], now=T + 1) == [True]
    assert broker.nack(claims["retry"], FAILURE, retry_at=T + 2, now=T + 1) is True
    assert broker.nack(claims["dead"], FAILURE, retry_at=None, now=T + 1) is True
    assert broker.nack(claims["cancelled-on-failure"], FAILURE, retry_at=T + 2, now=T + 1)
    assert broker.reject(claims["reject"], "unknown job: no job named 'x'", now=T + 1) is True
    assert broker.finish_cancelled(claims["finish-cancelled"], "cancelled by api", now=T + 1)
    assert broker.release([claims["release"], claims["release-cancelled"]], now=T + 1) == 2
    lost = [ids[way] for way in ("lost-requeued", "lost-dead", "lost-cancelled")]
    assert sorted(broker.sweep_expired(now=T + LEASE_S + 1)) == sorted(lost)
    assert {way: state_of(broker, ids[way]) for way in ways} == {
        "ack": State.SUCCEEDED, "retry": State.RETRYING, "dead": State.DEAD,
        "cancelled-on-failure": State.CANCELLED, "reject": State.REJECTED,
        "finish-cancelled": State.CANCELLED, "release": State.QUEUED,
        "release-cancelled": State.CANCELLED, "lost-requeued": State.QUEUED,
        "lost-dead": State.DEAD, "lost-cancelled": State.CANCELLED,
    }  # fmt: skip
    assert running_by_tag(broker) == {"walk": 0, **dict.fromkeys(ways, 0)}

    # a claim whose lease was lost writes nothing, so it moves no count either
    assert broker.ack([(claims["lost-requeued"], None)], now=T + LEASE_S + 2) == [False]
    assert broker.release([claims["release"]], now=T + LEASE_S + 2) == 0
    assert running_by_tag(broker)["walk"] == 0
    # the jobs that went back to waiting run again, and are counted again
    assert broker.promote_due(now=T + LEASE_S + 2) == 1  # the retry
    again = broker.claim(["default"], "w2", LEASE_S, limit=100, now=T + LEASE_S + 3)
    waited_again = ("retry", "release", "lost-requeued")
    assert sorted(c.id for c in again) == sorted(ids[way] for way in waited_again)
    assert running_by_tag(broker)["walk"] == 3
    assert broker.ack([(c, None) for c in again], now=T + LEASE_S + 4) == [True] * 3
    assert running_by_tag(broker) == {"walk": 0, **dict.fromkeys(ways, 0)}


def test_one_ack_batch_counts_each_of_its_jobs_under_each_of_its_tags(broker: Broker) -> None:
    broker.enqueue(
        [envelope_for("resize_video", tags=("edge-1", "batch")) for _ in range(60)]
        + [envelope_for("send_email", tags=("batch",)) for _ in range(40)],
        now=T,
    )
    claims = claim_all(broker)
    assert broker.ack([(c, None) for c in claims], now=T + 2) == [True] * 100
    stats = broker.stats(tags=True)
    assert dict(stats.tags["batch"].counts) == {"succeeded": 100}
    assert dict(stats.tags["batch"].jobs) == {"resize_video": 60, "send_email": 40}
    assert stats.tags["batch"].run_time.count == 100
    assert dict(stats.tags["edge-1"].counts) == {"succeeded": 60}
    assert stats.tags["edge-1"].run_time.max == pytest.approx(2.0)


def test_tags_past_the_cap_are_summed_together_and_kept_tags_keep_counting(
    broker: Broker,
) -> None:
    extra = 3
    broker.enqueue(
        [envelope_for("resize_video", tags=(f"user-{n:04d}",)) for n in range(MAX_TAGS + extra)],
        now=T,
    )
    claims = broker.claim(["default"], "w1", LEASE_S, limit=MAX_TAGS + extra, now=T)
    assert len(claims) == MAX_TAGS + extra
    stats = broker.stats(tags=True)
    assert len(stats.tags) == MAX_TAGS and all(t.running == 1 for t in stats.tags.values())
    assert stats.other_tags is not None
    assert (stats.other_tags.running, stats.other_tags.wait_time.count) == (extra, extra)
    assert all(broker.ack([(c, None) for c in claims], now=T + 1))
    stats = broker.stats(tags=True)
    assert len(stats.tags) == MAX_TAGS
    assert stats.other_tags is not None
    assert dict(stats.other_tags.counts) == {"succeeded": extra}
    assert stats.other_tags.run_time.count == extra
    assert stats.other_tags.running == 0 and all(t.running == 0 for t in stats.tags.values())
    kept = next(iter(stats.tags))
    enqueue_one(broker, tags=(kept, "one-more-new-tag"))
    assert broker.ack([(claim_one(broker, now=T + 2), None)], now=T + 3) == [True]
    stats = broker.stats(tags=True)
    assert len(stats.tags) == MAX_TAGS and "one-more-new-tag" not in stats.tags
    assert stats.tags[kept].counts["succeeded"] == 2
    assert stats.other_tags is not None and stats.other_tags.counts["succeeded"] == extra + 1


# -- timeline ----------------------------------------------------------------------------------


def test_the_timeline_counts_outcomes_per_job_and_minute(broker: Broker) -> None:
    broker.enqueue([envelope_for("resize_video") for _ in range(6)], now=M)
    broker.enqueue([envelope_for("send_email")], now=M)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=7, now=M)
    videos = [c for c in claims if c.envelope.job == "resize_video"]
    [email] = [c for c in claims if c.envelope.job == "send_email"]
    broker.ack([(c, None) for c in videos[:3]], now=M + 0.5)  # minute 0: runs of 0.5 s
    broker.nack(videos[3], FAILURE, retry_at=M + 600, now=M + 59)  # minute 0: a retry
    broker.ack([(videos[4], None)], now=M + 62)  # minute 1: a 62 s run
    broker.nack(videos[5], FAILURE, retry_at=None, now=M + 125)  # minute 2: dead
    broker.reject(email, "bad signature: unknown key", now=M + 125)
    seen = points(broker, since=M, now=M + 130)
    assert sorted(seen) == [
        ("resize_video", M),
        ("resize_video", M + 60),
        ("resize_video", M + 120),
        ("send_email", M + 120),
    ]
    first = seen[("resize_video", M)]
    assert (first.succeeded, first.retries, first.dead, first.failures) == (3, 1, 0, 1)
    assert first.run_time.count == 4  # the retried attempt ran too
    assert first.run_time.quantile(0.5) == pytest.approx(0.5, rel=0.25)
    assert first.run_time.max == pytest.approx(59.0)
    second = seen[("resize_video", M + 60)]
    assert (second.succeeded, second.finished, second.run_time.max) == (1, 1, pytest.approx(62.0))
    third = seen[("resize_video", M + 120)]
    assert (third.dead, third.failures, third.finished) == (1, 1, 1)
    assert seen[("send_email", M + 120)].rejected == 1


def test_the_timeline_reads_from_the_minute_holding_since_up_to_now(broker: Broker) -> None:
    for minute in range(5):
        enqueue_one(broker, now=M + 60 * minute)
        claim = claim_one(broker, now=M + 60 * minute)
        broker.ack([(claim, None)], now=M + 60 * minute + 1)
    assert [p.at for p in broker.timeline(M + 90, now=M + 200)] == [M + 60, M + 120, M + 180]
    assert [p.at for p in broker.timeline(M, now=M + 30)] == [M]
    assert broker.timeline(M + 600, now=M + 700) == []
    assert broker.timeline(M + 200, now=M + 100) == []  # since after now


def test_the_timeline_keeps_only_the_last_two_hours(broker: Broker) -> None:
    late = M + TIMELINE_KEEP_S + 180
    for at in (M, late):
        enqueue_one(broker, now=at)
        broker.ack([(claim_one(broker, now=at), None)], now=at + 1)
    seen = [p.at for p in broker.timeline(M - 3600, now=late)]
    assert seen == [late]  # M's minute is more than TIMELINE_KEEP_S before now
    earliest = broker.timeline(0, now=late + 1)
    assert [p.at for p in earliest] == [late]


# -- failure groups ----------------------------------------------------------------------------


def test_failures_are_grouped_by_job_and_exception_type_with_the_latest(broker: Broker) -> None:
    ids = [enqueue_one(broker, "upload") for _ in range(4)] + [enqueue_one(broker, "resize_video")]
    claims = {c.id: c for c in broker.claim(["default"], "w1", LEASE_S, limit=5, now=T)}
    timeout = Failure("TimeoutError", "storage timed out", "Traceback ...\nTimeoutError\n")
    broker.nack(claims[ids[0]], timeout, retry_at=T + 60, now=T + 1)
    broker.nack(claims[ids[1]], timeout, retry_at=None, now=T + 3)
    broker.nack(claims[ids[2]], Failure("TimeoutError", "later", ""), retry_at=None, now=T + 2)
    broker.nack(claims[ids[3]], FAILURE, retry_at=None, now=T + 4)
    broker.nack(claims[ids[4]], FAILURE, retry_at=T + 60, now=T + 5)
    groups = broker.failure_groups()
    assert [(g.job, g.type, g.failures, g.dead) for g in groups] == [
        ("upload", "TimeoutError", 3, 2),
        ("resize_video", "ValueError", 1, 0),
        ("upload", "ValueError", 1, 1),
    ]
    latest = groups[0]
    assert (latest.latest_id, latest.latest_message, latest.latest_at) == (
        ids[1],
        "storage timed out",
        T + 3,
    )  # the failure at T + 2 was recorded after it, but happened before
    assert [g.type for g in broker.failure_groups(limit=1)] == ["TimeoutError"]
    record = broker.get(latest.latest_id)
    assert record is not None and record.error == timeout  # the traceback is on the record


def test_a_worker_lost_on_the_last_attempt_counts_as_a_lease_expired_failure(
    broker: Broker,
) -> None:
    job_id = enqueue_one(broker, max_retries=0, tags=("edge-1",))
    claim_one(broker, lease_s=5, now=T)
    assert broker.sweep_expired(now=T + 10) == [job_id]
    [group] = broker.failure_groups()
    assert (group.job, group.type, group.failures, group.dead) == ("resize_video", "LeaseExpired",
                                                                   1, 1)  # fmt: skip
    assert group.latest_id == job_id and "stopped heart-beating" in group.latest_message
    assert dict(tag(broker, "edge-1").counts) == {"dead": 1}
    [point] = broker.timeline(T, now=T + 10)
    assert point.dead == 1


def test_a_failure_group_keeps_a_bounded_message(broker: Broker) -> None:
    enqueue_one(broker)
    huge = Failure("ValueError", "é" * (FAILURE_MESSAGE_CHARS + 500), "")
    broker.nack(claim_one(broker), huge, retry_at=None, now=T + 1)
    [group] = broker.failure_groups()
    assert group.latest_message == "é" * FAILURE_MESSAGE_CHARS
    record = broker.get(group.latest_id)
    assert record is not None and record.error == huge  # the record keeps all of it


def test_failure_groups_past_the_cap_are_summed_in_one(broker: Broker) -> None:
    total = MAX_FAILURE_GROUPS + 2
    broker.enqueue([envelope_for("upload") for _ in range(total)], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=total, now=T)
    for n, claim in enumerate(claims):
        broker.nack(claim, Failure(f"Error{n:04d}", "x", ""), retry_at=None, now=T + 1)
    groups = broker.failure_groups(limit=total)
    assert len(groups) == MAX_FAILURE_GROUPS + 1
    [rest] = [g for g in groups if (g.job, g.type) == ("", "")]
    assert (rest.failures, rest.dead) == (2, 2)
    assert sum(g.failures for g in groups) == total


# -- counts per queue, purge -------------------------------------------------------------------


def test_counts_are_also_kept_per_queue(broker: Broker) -> None:
    job_in_state(broker, State.SUCCEEDED, queue="media")
    job_in_state(broker, State.SUCCEEDED, queue="default")
    job_in_state(broker, State.QUEUED, queue="default")
    video = broker.stats().jobs["resize_video"]
    assert {q: dict(c) for q, c in video.by_queue.items()} == {
        "default": {"succeeded": 1, "queued": 1},
        "media": {"succeeded": 1},
    }
    assert dict(video.counts) == {"succeeded": 2, "queued": 1}


def test_purge_drops_tag_timeline_and_failure_numbers(broker: Broker) -> None:
    job_in_state(broker, State.DEAD, tags=("edge-1",))
    broker.purge()
    stats = broker.stats(tags=True)
    assert (stats.tags, stats.other_tags) == ({}, None)
    assert broker.timeline(T - 60, now=T + 60) == []
    assert broker.failure_groups() == []
