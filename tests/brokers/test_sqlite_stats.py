"""What only the SQLite broker's numbers promise: old timeline minutes are deleted as new ones
are written, and an ack batch writes its numbers with statements that do not grow with it (one
upsert per distinct key), and so does a claim batch. Reads the connection's statement trace, on a
real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from backroom.brokers import connect
from backroom.brokers.base import TIMELINE_KEEP_S
from backroom.brokers.sqlite import SQLiteBroker
from tests.brokers.test_conformance import LEASE_S, T
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SQLiteBroker]:
    with closing(connect(f"sqlite:///{tmp_path / 'jobs.db'}")) as opened:
        assert isinstance(opened, SQLiteBroker)
        yield opened


def finish_one(broker: SQLiteBroker, at: float) -> None:
    broker.enqueue([envelope_for("resize_video")], now=at)
    [claim] = broker.claim(["default"], "w1", LEASE_S, limit=1, now=at)
    assert broker.ack([(claim, None)], now=at + 1) == [True]


def test_timeline_minutes_older_than_the_keep_window_are_deleted(
    broker: SQLiteBroker, tmp_path: Path
) -> None:
    finish_one(broker, T)
    finish_one(broker, T + TIMELINE_KEEP_S + 120)
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as db:
        minutes = {row[0] for row in db.execute("SELECT minute FROM timeline")}
    assert minutes == {int((T + TIMELINE_KEEP_S + 121) // 60)}


def statements_writing_numbers(broker: SQLiteBroker, jobs: int) -> list[str]:
    """The statements (each executemany row counts) an ack of `jobs` tagged jobs runs against
    the per-tag and per-minute tables."""
    broker.purge()
    tags = ("edge-1", "vip")
    broker.enqueue([envelope_for("resize_video", tags=tags) for _ in range(jobs)], now=T)
    claims = broker.claim(["default"], "w1", LEASE_S, limit=jobs, now=T)
    broker.ack([(claims[0], None)], now=T + 1)  # the tags are known from here on
    traced: list[str] = []
    broker._db.set_trace_callback(traced.append)
    try:
        assert all(broker.ack([(c, None) for c in claims[1:]], now=T + 1))
    finally:
        broker._db.set_trace_callback(None)
    return [s for s in traced if any(t in s for t in ("tag_names", "tag_counts", "timeline"))]


def test_an_ack_batch_writes_its_numbers_with_one_upsert_per_distinct_key(
    broker: SQLiteBroker,
) -> None:
    small, large = statements_writing_numbers(broker, 10), statements_writing_numbers(broker, 100)
    assert len(large) == len(small)
    # 2 tags x (succeeded, j:resize_video, one bucket, rt, rm, running) + the minute's 4 + the
    # tag lookup
    assert len(large) == 2 * 6 + 4 + 1, large


def statements_writing_numbers_at_claim(broker: SQLiteBroker, jobs: int) -> list[str]:
    """The statements (each executemany row counts) a claim of `jobs` tagged jobs runs against
    the per-tag tables."""
    broker.purge()
    tags = ("edge-1", "vip")
    broker.enqueue([envelope_for("resize_video", tags=tags) for _ in range(jobs + 1)], now=T)
    broker.claim(["default"], "w1", LEASE_S, limit=1, now=T)  # the tags are known from here on
    traced: list[str] = []
    broker._db.set_trace_callback(traced.append)
    try:
        assert len(broker.claim(["default"], "w1", LEASE_S, limit=jobs, now=T + 1)) == jobs
    finally:
        broker._db.set_trace_callback(None)
    return [s for s in traced if any(t in s for t in ("tag_names", "tag_counts"))]


def test_a_claim_batch_writes_its_numbers_with_one_upsert_per_distinct_key(
    broker: SQLiteBroker,
) -> None:
    small = statements_writing_numbers_at_claim(broker, 10)
    large = statements_writing_numbers_at_claim(broker, 200)
    assert len(large) == len(small)
    # 2 tags x (one wait bucket, wt, wm, running) + the tag lookup
    assert len(large) == 2 * 4 + 1, large
