"""The fault-injection rig: real `backroom worker` processes (supervised or in-process) serving
tests/apps/faulty.py on a real broker (a SQLite file, or the session's redis-server), whose jobs
write each execution to a ledger. Each scenario adds its numbers to a report printed at the end
(`python -m pytest tests/faults` shows it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path

import pytest

from backroom.app import App, Handle
from backroom.brokers.base import JobRecord
from backroom.envelope import FINAL_STATES
from tests.apps import faulty
from tests.apps.faulty import Execution, create_ledger, executions
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.faulty:app"
BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.redis)]


class Rig:
    """One scenario's broker, ledger and worker processes. Every process starts in a session of
    its own, so cleanup kills a supervisor's children along with it."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.ledger = workdir / "ledger.db"
        create_ledger(self.ledger)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FAULTS_LEDGER": str(self.ledger),
            "BACKROOM_URL": url,
        }
        self.env.pop("BACKROOM_APP", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.app: App = faulty.app
        self.app.close()
        self.app.url = url
        self.killed: set[int] = set()  # pids this scenario killed on purpose

    def worker(self, *args: str, supervised: bool = False) -> subprocess.Popen[bytes]:
        """`backroom worker` with these arguments: a supervisor and its children, or (the
        default) one in-process worker. Its log goes to a file in the scenario's folder."""
        command = [
            sys.executable,
            "-m",
            "backroom",
            "worker",
            "--app",
            APP,
            "--url",
            self.url,
            *args,
            *(() if supervised else ("--in-process",)),
        ]
        log = open(self.workdir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                command,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.killed.add(proc.pid)
        proc.kill()
        proc.wait()

    def logs(self, limit: int = 1 << 20) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}"
            for path in sorted(self.workdir.glob("worker-*.log"))
        )

    def logged(self, text: str, count: int = 1, deadline_s: float = 30) -> None:
        """Wait until the workers' logs say `text` at least `count` times."""
        wait_until(
            lambda: self.logs().count(text) >= count,
            deadline_s=deadline_s,
            what=f"{count} worker log line(s) saying {text!r}",
        )

    def records(self, handles: Sequence[Handle]) -> list[JobRecord]:
        found: list[JobRecord] = []
        for start in range(0, len(handles), 500):
            chunk = self.app.broker.get_many([h.id for h in handles[start : start + 500]])
            assert all(r is not None for r in chunk), "an accepted job vanished from the broker"
            found.extend(r for r in chunk if r is not None)
        return found

    def settle(self, handles: Sequence[Handle], deadline_s: float = 60) -> list[JobRecord]:
        """Wait until every job is in a final state; their records, in order."""
        pending = list(handles)

        def all_final() -> bool:
            nonlocal pending
            records = self.records(pending)
            pending = [
                h for h, r in zip(pending, records, strict=True) if r.state not in FINAL_STATES
            ]
            return not pending

        try:
            wait_until(all_final, deadline_s=deadline_s, what="every accepted job to end")
        except AssertionError:
            states = {r.state for r in self.records(pending)}
            raise AssertionError(
                f"{len(pending)} job(s) never ended (states {states})\n{self.logs(4000)}"
            ) from None
        return self.records(handles)

    def executions(self, job: str | None = None) -> list[Execution]:
        return executions(self.ledger, job)

    def started(self, job: str, count: int = 1, deadline_s: float = 30) -> list[Execution]:
        """Wait until `job` has run at least `count` times (its ledger rows); returns them."""
        try:
            wait_until(
                lambda: len(self.executions(job)) >= count,
                deadline_s=deadline_s,
                what=f"{count} execution(s) of {job}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs(4000)}") from None
        return self.executions(job)

    def stop_all(self) -> None:
        for proc in self.procs:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.app.close()


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")
    built = Rig(url, tmp_path)
    built.app.broker.purge()  # the session's redis is shared by the tests of this process
    try:
        yield built
    finally:
        built.stop_all()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines this scenario adds to the fault-injection report."""
    lines: list[str] = []
    yield lines
    for line in lines:
        print(line)
        request.node.user_properties.append(("fault report", line))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        (report.nodeid.split("::")[-1], value)
        for report in _reports(terminalreporter.stats.values())
        for name, value in report.user_properties
        if name == "fault report"
    ]
    if lines:
        terminalreporter.section("fault-injection report")
        for nodeid, line in lines:
            terminalreporter.write_line(f"{nodeid}: {line}")


def _reports(groups: Iterable[object]) -> Iterator[pytest.TestReport]:
    for group in groups:
        for report in group if isinstance(group, list) else ():
            if isinstance(report, pytest.TestReport) and report.when == "teardown":
                yield report


def duplicates_explained(runs: Sequence[Execution], killed: set[int]) -> tuple[int, list[str]]:
    """Count executions beyond the first of each job; each must be explained: every execution
    but a job's last ran in a process that was killed. Returns (count, the unexplained)."""
    by_job: dict[tuple[str, int], list[Execution]] = {}
    for run in runs:
        by_job.setdefault((run.job, run.n), []).append(run)
    count, unexplained = 0, []
    for (job, n), seen in by_job.items():
        count += len(seen) - 1
        for run in seen[:-1]:
            if run.pid not in killed:
                unexplained.append(f"{job}({n}) ran in pid {run.pid} (not killed) and again")
    return count, unexplained
