"""Apps for the scheduling and job-control tests.

`app` is what `backroom scheduler --app tests.apps.scheduled:app` loads: a monthly invoice run
only the scheduler may start, and a report every minute. `Harness` builds a fresh App whose jobs
record, in order, what ran in this process. Run as a module, this file is a racing producer:

    python -m tests.apps.scheduled fire URL START TICKS   # Scheduler.tick over TICKS minutes
    python -m tests.apps.scheduled unique URL KEY COUNT   # COUNT enqueues of one unique key

Each prints "ready", waits for a line on stdin (so all of them start together), does its work
and prints one JSON document: what it created or got back. `race` runs them; `cli` and
`start_cli` run the `backroom` command; `broker_url` picks a broker for a test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import backroom
from backroom.scheduler import Scheduler
from backroom.worker import Worker

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[2]
# Tests run on every broker; Redis joins once backroom/brokers/redis.py exists.
HAS_REDIS_BROKER = importlib.util.find_spec("backroom.brokers.redis") is not None


def broker_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh broker of this kind (Redis: the session's redis-server)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url: str = request.getfixturevalue("redis_server")
    return url


app = backroom.App(source="api")


@app.job(sources={"scheduler"}, tags=("billing",))
def send_invoices(ctx: backroom.Context, month: str) -> dict[str, Any]:
    return {"month": month, "sent": 3}


@app.job()
def report(ctx: backroom.Context, kind: str) -> str:
    return kind


app.schedule("send_invoices", cron="0 6 1 * *", payload={"month": "previous"},
             timezone="Europe/Berlin")  # fmt: skip
app.schedule("report", cron="* * * * *", payload={"kind": "minutely"}, name="every_minute")


class Harness:
    """A fresh App on `url` whose jobs append what they ran to `ran`, in execution order.

    Jobs: `note` (queue default) and `transcode` (queue media) record their label; `hold`
    records its label, then waits until `release(label)`; `fail_once` fails its first attempt
    and retries a minute later; `send_invoices` may only be started by the scheduler."""

    def __init__(self, url: str, **options: Any) -> None:
        self.app = backroom.App(url, source="api", **options)
        self.ran: list[str] = []
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        application = self.app

        @application.job()
        def note(ctx: backroom.Context, label: str) -> str:
            self.ran.append(label)
            return label

        @application.job(queue="media")
        def transcode(ctx: backroom.Context, label: str) -> str:
            self.ran.append(label)
            return label

        @application.job()
        def hold(ctx: backroom.Context, label: str) -> str:
            self.ran.append(label)
            if not self.gate(label).wait(timeout=60):
                raise TimeoutError(f"{label} was never released")
            return label

        @application.job(retries=3, retry_backoff=60.0)
        def fail_once(ctx: backroom.Context, label: str) -> str:
            self.ran.append(label)
            if ctx.attempt == 1:
                raise ConnectionError(f"{label}: first attempt fails")
            return label

        @application.job(sources={"scheduler"})
        def send_invoices(ctx: backroom.Context, month: str) -> dict[str, Any]:
            self.ran.append(f"invoices:{month}:{ctx.source}")
            return {"month": month, "sent": 3}

    def enqueue_at(
        self, now: float, job: str, payload: Mapping[str, Any], **options: Any
    ) -> backroom.Handle:
        """Enqueue as if the clock read `now`: time moves in tests, nobody sleeps."""
        envelope = self.app.envelope(job, payload, now=now, **options)
        [job_id] = self.app.broker.enqueue([envelope], now=now)
        return self.app.handle(job_id)

    @contextmanager
    def worker(self, **options: Any) -> Iterator[Worker]:
        """A real (in-process) worker serving in a thread until the block ends; held jobs are
        released first, so it always stops."""
        worker = Worker(self.app, **options)
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                worker.run()
            except BaseException as exc:  # reported in the test, not lost in the thread
                failures.append(exc)

        thread = threading.Thread(target=serve, name="backroom-test-worker", daemon=True)
        thread.start()
        try:
            yield worker
        finally:
            self.release_all()
            worker.stop()
            thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop within 30 s"
        assert not failures, f"the worker crashed: {failures[0]!r}"

    def gate(self, label: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(label, threading.Event())

    def release(self, label: str) -> None:
        self.gate(label).set()

    def release_all(self) -> None:
        with self._lock:
            for gate in self._gates.values():
                gate.set()


def race(command: str, url: str, *args: str, processes: int) -> list[dict[str, Any]]:
    """Run `python -m tests.apps.scheduled COMMAND URL ARGS` in several processes at once:
    start them all, wait until each is connected ("ready"), then let them go together."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tests.apps.scheduled", command, url, *args]
    procs = [
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", "a racing process did not start"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"a racing process exited with {proc.returncode}"
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def cli(*args: str, url: str, env: Mapping[str, str] | None = None, ok: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `backroom ARGS` against the broker at `url`; check the exit code."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "BACKROOM_URL": url, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "backroom", *args], capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, env=full_env, cwd=ROOT,
                          timeout=timeout)  # fmt: skip
    assert (proc.returncode == 0) is ok, proc.stderr
    return proc


def start_cli(*args: str, url: str, stderr: Path) -> subprocess.Popen[bytes]:
    """Start a long-running `backroom ARGS` (scheduler, worker) logging to the file `stderr`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BACKROOM_URL": url}
    with stderr.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "backroom", *args], env=env, cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # fmt: skip


# -- racing producers, one per process -------------------------------------------------------


def _fire(start: float, ticks: int) -> dict[str, Any]:
    """Tick the every-minute schedule through `ticks` minutes from `start` (a minute boundary,
    just after this scheduler started), several times per minute, as a running scheduler would.
    Every minute from `start` on is a tick."""
    scheduler = Scheduler(app, started_at=start - 1)
    created = 0
    for minute in range(ticks):
        for offset in (0.0, 0.5, 30.0):
            created += scheduler.tick(now=start + 60 * minute + offset)
    app.close()
    return {"created": created}


def _unique(key: str, count: int) -> dict[str, Any]:
    ids = [app.enqueue("report", {"kind": "unique"}, unique_key=key).id for _ in range(count)]
    app.close()
    return {"ids": sorted(set(ids)), "count": len(ids)}


def main(argv: Sequence[str]) -> int:
    command, url, *rest = argv
    app.url = url
    app.broker  # noqa: B018 - connect before "ready", so the race starts with every process warm
    print("ready", flush=True)
    sys.stdin.readline()
    if command == "fire":
        outcome = _fire(float(rest[0]), int(rest[1]))
    elif command == "unique":
        outcome = _unique(rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
