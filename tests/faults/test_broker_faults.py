"""Scenarios 5-7: the broker misbehaves. Redis restarted (appendonly) or frozen with SIGSTOP
mid-run; the SQLite file made read-only, or its disk full; malformed envelopes written straight
into the broker. Producers get a clear error, workers ride it out, nothing accepted is lost."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from backroom.brokers.base import JobQuery
from backroom.envelope import Envelope, State, new_id
from backroom.errors import BrokerError
from tests.faults.conftest import Rig, duplicates_explained
from tests.helpers import free_port, redis_answers, wait_until

# -- 5: redis restarted, redis frozen --------------------------------------------------------


class PrivateRedis:
    """A redis-server of the scenario's own (appendonly yes), to restart and freeze."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server") or pytest.fail("redis-server not found on PATH")
        command = [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        wait_until(lambda: redis_answers(self.url), deadline_s=20, what="redis-server to start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()  # a clean shutdown: the append-only file is complete
            self.proc.wait(timeout=30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _drain_through(
    rig: Rig, fault: str, inject: object, jobs: int, report: list[str], lease: str
) -> None:
    handles = rig.app.enqueue_many("record", [{"n": n} for n in range(jobs)])
    for _ in range(2):
        rig.worker("--concurrency", "4", "--lease", lease)
    rig.started("record", count=jobs // 10)
    assert callable(inject)
    inject()
    records = rig.settle(handles, deadline_s=90)
    assert [r.state for r in records] == [State.SUCCEEDED] * jobs
    runs = rig.executions("record")
    assert {run.n for run in runs} == set(range(jobs))
    stats = rig.app.broker.stats().jobs["record"]
    duplicates = len(runs) - jobs
    # a job runs twice only when it was claimed twice: after its lease expired (a recovery)
    assert duplicates <= stats.recoveries, (duplicates, stats.recoveries)
    report.append(
        f"{jobs} jobs, {fault}: all succeeded, none lost; {duplicates} duplicate "
        f"executions, {stats.recoveries} lease recoveries"
    )


@pytest.mark.redis
def test_scenario_5a_redis_restarted_mid_run_loses_nothing(
    private_redis: PrivateRedis, tmp_path: Path, report: list[str]
) -> None:
    rig = Rig(private_redis.url, tmp_path)
    try:

        def restart() -> None:
            private_redis.stop()
            private_redis.start()

        _drain_through(
            rig,
            "redis-server restarted mid-run (appendonly yes)",
            restart,
            jobs=2000,
            report=report,
            lease="30",
        )
    finally:
        rig.stop_all()


@pytest.mark.redis
def test_scenario_5b_redis_frozen_for_10_seconds_mid_run_loses_nothing(
    private_redis: PrivateRedis, tmp_path: Path, report: list[str]
) -> None:
    rig = Rig(private_redis.url, tmp_path)
    try:

        def freeze() -> None:
            assert private_redis.proc is not None
            os.kill(private_redis.proc.pid, signal.SIGSTOP)
            time.sleep(10)  # the fault itself: redis-server frozen for 10 s
            os.kill(private_redis.proc.pid, signal.SIGCONT)

        _drain_through(
            rig,
            "redis-server frozen with SIGSTOP for 10 s",
            freeze,
            jobs=2000,
            report=report,
            lease="30",
        )
    finally:
        rig.stop_all()


# -- 6: the SQLite file read-only, the disk full ----------------------------------------------


class SmallDisk:
    """A tmpfs of `size` mounted in the scenario's folder (root with CAP_SYS_ADMIN)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> bool:
        self.path.mkdir(exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
            capture_output=True,
        )
        return done.returncode == 0

    def remount(self, options: str) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True
        )

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk | None]:
    disk = SmallDisk(tmp_path / "disk")
    mounted = shutil.which("mount") is not None and disk.mount("1m")
    try:
        yield disk if mounted else None
    finally:
        if mounted:
            disk.unmount()


def _sqlite_rig(tmp_path: Path, folder: Path) -> Rig:
    rig = Rig(f"sqlite:///{folder / 'jobs.db'}", tmp_path)
    rig.app.broker.purge()
    return rig


def test_scenario_6a_a_read_only_sqlite_file_gives_producers_a_clear_error_and_loses_nothing(
    small_disk: SmallDisk | None, tmp_path: Path, report: list[str]
) -> None:
    folder = small_disk.path if small_disk else tmp_path / "data"
    folder.mkdir(exist_ok=True)
    rig = _sqlite_rig(tmp_path, folder)
    try:
        accepted = rig.app.enqueue_many("record", [{"n": n} for n in range(100)])
        rig.app.close()
        if small_disk:
            small_disk.remount("ro")
        elif os.geteuid() != 0:
            for path in (folder / "jobs.db", folder):
                path.chmod(0o555)
        else:
            pytest.skip("root without mount(8): no way to make a file read-only for root")
        with pytest.raises(BrokerError) as refused:
            rig.app.enqueue("record", {"n": 100})
        assert "is read-only" in str(refused.value) or "cannot open" in str(refused.value)
        assert str(rig.url) in str(refused.value)
        rig.app.close()
        if small_disk:
            small_disk.remount("rw,size=64m")
        else:
            for path in (folder, folder / "jobs.db"):
                path.chmod(0o755)
        assert rig.worker("--burst").wait(timeout=60) == 0
        records = rig.settle(accepted)
        assert [r.state for r in records] == [State.SUCCEEDED] * 100
        assert sorted(run.n for run in rig.executions("record")) == list(range(100))
        report.append(
            f"read-only SQLite file: producers got `{refused.value}`; the 100 jobs "
            "accepted before ran once each when it was writable again"
        )
    finally:
        rig.stop_all()


def test_scenario_6b_a_full_disk_gives_producers_a_clear_error_and_loses_nothing(
    small_disk: SmallDisk | None, tmp_path: Path, report: list[str]
) -> None:
    folder = small_disk.path if small_disk else tmp_path / "data"
    folder.mkdir(exist_ok=True)
    rig = _sqlite_rig(tmp_path, folder)
    try:
        if small_disk is None:  # no tmpfs: a size limit on the producer's connection instead
            rig.app.broker._db.execute("PRAGMA max_page_count = 300")  # type: ignore[attr-defined]
        accepted = []
        with pytest.raises(BrokerError) as refused:
            for start in range(0, 100_000, 100):
                batch = [{"n": n} for n in range(start, start + 100)]
                accepted += rig.app.enqueue_many("record", batch)
        assert "disk full" in str(refused.value) and str(rig.url) in str(refused.value)
        assert accepted, "the disk filled before anything was accepted"
        rig.app.close()
        if small_disk:
            small_disk.remount("size=64m")
        with sqlite3.connect(folder / "jobs.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert rig.worker("--burst", "--concurrency", "16").wait(timeout=60) == 0
        records = rig.settle(accepted)
        assert [r.state for r in records] == [State.SUCCEEDED] * len(accepted)
        runs = sorted(run.n for run in rig.executions("record"))
        assert runs == list(range(len(accepted)))  # the refused batch never ran
        report.append(
            f"full disk: producers got `{refused.value}`; the {len(accepted)} jobs "
            "accepted before (integrity_check ok) ran once each after it grew"
        )
    finally:
        rig.stop_all()


# -- 7: malformed envelopes --------------------------------------------------------------------


def _smuggle(rig: Rig, garbage: list[bytes]) -> list[str]:
    """Store bytes that are not an envelope as queued jobs, as a buggy producer in another
    language might: the broker's own enqueue, with the envelope's encoding swapped out."""
    ids = []
    for raw in garbage:
        envelope = Envelope(id=new_id(), job="record", source="api", payload={"n": -1})
        with mock.patch.object(Envelope, "encode", lambda self, raw=raw: raw):
            rig.app.broker.enqueue([envelope])
        ids.append(envelope.id)
    return ids


def test_scenario_7_malformed_envelopes_are_rejected_with_a_reason_and_the_worker_survives(
    rig: Rig, report: list[str]
) -> None:
    smuggled = _smuggle(rig, [b"not json at all", b'{"job": 7}', b"[]"])
    unchecked = [  # well-formed, but refused by the worker's checks
        Envelope(id=new_id(), job="no_such_job", source="api"),
        Envelope(id=new_id(), job="record", source="api", payload={"n": "seven"}),
    ]
    rig.app.broker.enqueue(unchecked)
    good = rig.app.enqueue_many("record", [{"n": n} for n in range(10)])
    worker = rig.worker("--concurrency", "4")
    bad = [rig.app.handle(job_id) for job_id in [*smuggled, *(e.id for e in unchecked)]]
    records = rig.settle([*bad, *good])
    assert [r.state for r in records[: len(bad)]] == [State.REJECTED] * len(bad)
    assert all(r.reason for r in records[: len(bad)])
    unknown, invalid = (r.reason or "" for r in records[len(smuggled) : len(bad)])
    assert unknown.startswith("unknown job: 'no_such_job'"), unknown
    assert invalid.startswith("invalid payload: field 'n'"), invalid
    assert [r.state for r in records[len(bad) :]] == [State.SUCCEEDED] * 10
    assert worker.poll() is None  # it survived them all
    assert rig.app.enqueue("whoami", {"n": 11}).result(timeout=30) == worker.pid
    listed = rig.app.broker.jobs(JobQuery(state=State.REJECTED, limit=10))
    assert {r.id for r in listed} == {h.id for h in bad}
    duplicates, _ = duplicates_explained(rig.executions(), set())
    assert duplicates == 0
    reasons = sorted({(r.reason or "")[:40] for r in records[: len(bad)]})
    report.append(
        f"{len(bad)} malformed/unchecked envelopes rejected ({'; '.join(reasons)}); "
        "the worker served on"
    )
