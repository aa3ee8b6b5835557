"""What only the SQLite broker promises about its costs: every page of jobs (by state, by name,
by both, running ones, the next page) costs the same with twenty times more jobs in the file,
counted in SQLite virtual-machine steps (a progress handler); files written by older versions
get the current indexes when a broker opens them; a single enqueue writes at most 16 KiB to the
write-ahead log. On real files."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from backroom.brokers import JobQuery, connect
from backroom.brokers.sqlite import SQLiteBroker
from backroom.envelope import State
from tests.brokers.test_conformance import FAILURE, LEASE_S, T
from tests.helpers import envelope_for

pytestmark = pytest.mark.timeout(60)

RUNNING = 20


def filled(path: Path, per_job: int) -> SQLiteBroker:
    """`per_job` resize_video and as many send_email jobs: most succeeded, some dead, RUNNING
    of each running and the rest queued."""
    broker = connect(f"sqlite:///{path}")
    assert isinstance(broker, SQLiteBroker)
    for job in ("resize_video", "send_email"):
        for start in range(0, per_job, 1000):
            count = min(1000, per_job - start)
            broker.enqueue([envelope_for(job) for _ in range(count)], now=T)
    finishing = per_job * 2 * 3 // 4
    while finishing > 0:
        claims = broker.claim(["default"], "w1", LEASE_S, limit=min(1000, finishing), now=T)
        finishing -= len(claims)
        ok = [(c, None) for c in claims[: len(claims) * 9 // 10]]
        assert all(broker.ack(ok, now=T + 1))
        for claim in claims[len(ok) :]:
            assert broker.nack(claim, FAILURE, retry_at=None, now=T + 1)
    assert len(broker.claim(["default"], "w1", LEASE_S, limit=2 * RUNNING, now=T)) == 2 * RUNNING
    return broker


QUERIES = {
    "all": JobQuery(limit=20),
    "queued": JobQuery(state=State.QUEUED, limit=20),
    "succeeded": JobQuery(state=State.SUCCEEDED, limit=20),
    "running": JobQuery(state=State.RUNNING, limit=20),
    "by name": JobQuery(job="send_email", limit=20),
    "by name, dead": JobQuery(job="send_email", state=State.DEAD, limit=20),
    "by name, running": JobQuery(job="send_email", state=State.RUNNING, limit=20),
}


def steps(broker: SQLiteBroker, query: JobQuery) -> tuple[int, list[str]]:
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    broker._db.set_progress_handler(tick, 10)
    try:
        page = broker.jobs(query)
    finally:
        broker._db.set_progress_handler(None, 10)
    return count[0], [r.id for r in page]


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SQLiteBroker, ...]]:
    folder = tmp_path_factory.mktemp("listing")
    small, large = filled(folder / "small.db", 500), filled(folder / "large.db", 10_000)
    with closing(small), closing(large):
        yield small, large


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_a_page_of_jobs_costs_the_same_with_twenty_times_more_jobs(
    brokers: tuple[SQLiteBroker, SQLiteBroker], name: str
) -> None:
    small, large = brokers
    query = QUERIES[name]
    small_steps, small_page = steps(small, query)
    large_steps, large_page = steps(large, query)
    assert len(small_page) == len(large_page) == 20
    assert large_steps <= small_steps * 1.5 + 20, (small_steps, large_steps)
    # and the next page, from the last id of this one
    after = JobQuery(state=query.state, job=query.job, limit=20, before=large_page[-1])
    next_steps, next_page = steps(large, after)
    assert next_page and not set(next_page) & set(large_page)
    assert next_steps <= small_steps * 1.5 + 20, (small_steps, next_steps)


def test_a_file_from_an_older_version_gets_the_current_indexes(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    broker = filled(path, 100)
    broker.close()
    with closing(sqlite3.connect(path)) as db:  # the indexes an older version created
        db.execute("CREATE INDEX jobs_state ON jobs(state, seq)")
        db.execute("CREATE INDEX jobs_name ON jobs(job, seq)")
        db.execute("CREATE INDEX jobs_name_state ON jobs(job, state, seq)")
        db.execute("DROP INDEX jobs_by_name")
        db.commit()
    with closing(connect(f"sqlite:///{path}")) as reopened:
        page = reopened.jobs(JobQuery(job="send_email", state=State.SUCCEEDED, limit=5))
        assert [r.state for r in page] == [State.SUCCEEDED] * 5
    with closing(sqlite3.connect(path)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"jobs_by_state", "jobs_by_name"} <= names
    assert not names & {"jobs_state", "jobs_name", "jobs_name_state"}


def test_a_single_enqueue_writes_at_most_16_kib_to_the_write_ahead_log(tmp_path: Path) -> None:
    # Every page a commit touches goes to the log whole, and the checkpoint syncs it: the log
    # written per small commit is what a single enqueue costs (4 KiB pages wrote 26 KiB).
    path = tmp_path / "jobs.db"
    with closing(connect(f"sqlite:///{path}")) as broker:
        assert isinstance(broker, SQLiteBroker)
        broker.enqueue([envelope_for("resize_video") for _ in range(200)], now=T)
        broker._db.execute("PRAGMA wal_autocheckpoint = 0")
        broker._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for _ in range(300):
            broker.enqueue([envelope_for("resize_video")], now=T)
        per_enqueue = os.path.getsize(f"{path}-wal") / 300
    assert per_enqueue <= 16 * 1024, per_enqueue
