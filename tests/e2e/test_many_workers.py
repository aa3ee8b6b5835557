"""Real worker processes on one SQLite file or one Redis: none loses or doubles a job; a worker
killed with SIGKILL mid-job loses nothing, since its lease expires and another worker runs it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.apps.ledger import app, ledger_counts
from tests.e2e.conftest import Workers
from tests.helpers import wait_until


def test_four_worker_processes_drain_2000_jobs_each_exactly_once(
    tmp_path: Path, workers: Workers
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    app.url = url
    app.close()
    handles = app.enqueue_many("record", [{"n": n} for n in range(2000)])
    procs = [workers.start("--app", "tests.apps.ledger:app", "--url", url, "--in-process",
                           "--burst", "--concurrency", "4") for _ in range(4)]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    counts = ledger_counts(workers.env["LEDGER_DB"])
    assert sorted(counts) == list(range(2000)), "a job never ran"
    assert set(counts.values()) == {1}, "a job ran twice without any fault to explain it"
    states = {app.handle(h.id).status() for h in handles}
    assert states == {"succeeded"}
    stats = app.broker.stats().jobs["record"]
    assert stats.counts == {"succeeded": 2000}
    assert stats.recoveries == 0
    app.close()


@pytest.mark.redis
def test_four_worker_processes_drain_5000_jobs_from_redis_each_exactly_once(
    redis_server: str, workers: Workers
) -> None:
    url = redis_server.replace("/0", "/0?prefix=e2e")
    app.url = url
    app.close()
    app.broker.purge()
    app.enqueue_many("record", [{"n": n} for n in range(5000)])
    procs = [workers.start("--app", "tests.apps.ledger:app", "--url", url, "--in-process",
                           "--burst", "--concurrency", "4") for _ in range(4)]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    counts = ledger_counts(workers.env["LEDGER_DB"])
    assert sorted(counts) == list(range(5000)), "a job never ran"
    assert set(counts.values()) == {1}, "a job ran twice without any fault to explain it"
    stats = app.broker.stats().jobs["record"]
    assert stats.counts == {"succeeded": 5000} and stats.recoveries == 0
    app.broker.purge()
    app.close()


def test_a_job_whose_worker_is_killed_is_run_again_after_its_lease_expires(
    tmp_path: Path, workers: Workers
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    app.url = url
    app.close()
    release, started = tmp_path / "release", tmp_path / "started"
    handle = app.enqueue("block_until", {"path": str(release), "started": str(started)})
    first = workers.start("--app", "tests.apps.ledger:app", "--url", url, "--in-process",
                          "--lease", "1")  # fmt: skip
    wait_until(started.exists, deadline_s=30, what="the job to start in the first worker")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert handle.status() == "running"  # the dead worker still holds the lease, for now
    started.unlink()
    release.touch()
    second = workers.start("--app", "tests.apps.ledger:app", "--url", url, "--in-process",
                           "--burst", "--lease", "1")  # fmt: skip
    assert handle.result(timeout=60) == "done on attempt 2"
    assert second.wait(timeout=60) == 0
    assert app.broker.stats().jobs["block_until"].recoveries == 1
    app.close()
