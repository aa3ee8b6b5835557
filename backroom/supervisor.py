"""The supervisor: runs P child worker processes and no job code, so a job that hangs, leaks or
crashes its process never takes the worker down. Each child tells it, over a pipe, which jobs it
holds; when a child dies or freezes past a job's timeout, its replacement fails those jobs at
once (no lease wait). Also both ends of that pipe. It never imports the app."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

logger = logging.getLogger("backroom.supervisor")

EXIT_RECYCLE = 3
RESTART_BACKOFF_MAX_S = 10.0
STABLE_CHILD_S = 10.0  # a child that lived this long resets its slot's restart backoff
TICK_S = 0.05
BEAT_S = 1.0  # how often a child says it is alive, from its event loop
FROZEN_PAST_DEADLINE_S = 3.0  # a job this far past its timeout, in a child silent this long
STOP_MARGIN_S = 10.0  # after --grace, children get this long before they are killed
MAX_BACKLOG_BYTES = 1 << 22
MAX_ORPHANS = 2000  # beyond this many, a dead child's jobs wait for their lease to expire

CHANNEL_ENV = "BACKROOM_SUPERVISOR_FD"
ORPHANS_ENV = "BACKROOM_ORPHANS"
# A child stops gracefully on SIGTERM (never escalating: systemd may send it to every process
# of the group as well as to the supervisor) and at once on this signal from its supervisor.
STOP_NOW_SIGNAL = signal.SIGUSR2

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[Any]).decode


# -- the child's end -------------------------------------------------------------------------


class ChildChannel:
    """What a child tells its supervisor: `hello`, the jobs it `claim`s (id, attempt id), the
    ones it `start`s (id, timeout deadline; sent by the job's thread before the job runs, so a
    job that crashes the process is known to have started), the ones it is `done` with
    (outcome recorded), and a `beat` each second. A crash fails the started jobs and hands
    back the others. Writes never block the worker: if the supervisor stops reading, the
    backlog is dropped and the supervisor told to `reset` (those jobs then fall back to lease
    expiry). Any thread may send."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self._backlog = bytearray()
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> ChildChannel | None:
        fd = os.environ.pop(CHANNEL_ENV, None)
        if not fd:
            return None
        try:
            return cls(int(fd))
        except (OSError, ValueError):
            return None

    def send(self, *message: Any) -> None:
        with self._lock:
            self._send(message)

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._fd is None:
            return
        self._backlog += _encode(list(message)) + b"\n"
        while self._backlog:
            try:
                written = os.write(self._fd, self._backlog)
            except BlockingIOError:
                break
            except OSError:  # the supervisor is gone; the worker notices by its parent pid
                self._fd = None
                self._backlog.clear()
                return
            del self._backlog[:written]
        if len(self._backlog) > MAX_BACKLOG_BYTES:
            self._backlog = bytearray(b'\n["reset"]\n')  # the newline ends a half-sent line


def orphans_from_environment() -> list[dict[str, Any]]:
    """The jobs a dead predecessor held, handed to its replacement to settle."""
    raw = os.environ.pop(ORPHANS_ENV, None)
    if not raw:
        return []
    try:
        orphans = json.loads(raw)
    except ValueError:
        return []
    return [o for o in orphans if isinstance(o, dict) and "id" in o and "attempt_id" in o]


# -- the supervisor's end --------------------------------------------------------------------


@dataclass
class _Child:
    slot: int
    process: subprocess.Popen[bytes]
    reader: int | None
    started: float = field(default_factory=time.monotonic)
    buffer: bytearray = field(default_factory=bytearray)
    held: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # id -> attempt, due
    running: set[str] = field(default_factory=set)  # held jobs that started (the others wait)
    ready: bool = False  # said hello: settled its predecessor's jobs, serving
    last_beat: float = field(default_factory=time.monotonic)
    overdue: set[str] = field(default_factory=set)  # set when killed for being stuck past these
    killed: str = ""  # why the supervisor killed it

    def __post_init__(self) -> None:
        if self.reader is not None:
            os.set_blocking(self.reader, False)

    def read(self) -> None:
        """Take in whatever the child wrote (non-blocking); EOF closes the pipe."""
        while self.reader is not None:
            try:
                chunk = os.read(self.reader, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                os.close(self.reader)
                self.reader = None
                return
            self.buffer += chunk
            *lines, rest = self.buffer.split(b"\n")
            self.buffer = bytearray(rest)
            for line in lines:
                self._take(line)

    def _take(self, line: bytes | bytearray) -> None:
        try:
            kind, *rest = _decode(line)
        except (msgspec.DecodeError, ValueError):
            return  # half a line left by a child that dropped its backlog
        self.last_beat = time.monotonic()
        if kind == "claim":
            for job_id, attempt_id, due in rest[0]:
                self.held[job_id] = (attempt_id, due)
        elif kind == "start":
            for job_id, due in rest[0]:
                if job_id in self.held:
                    self.held[job_id] = (self.held[job_id][0], due)
                    self.running.add(job_id)
        elif kind == "done":
            for job_id in rest[0]:
                self.held.pop(job_id, None)
                self.running.discard(job_id)
        elif kind == "hello":
            self.ready = True
        elif kind == "reset":
            self.held.clear()
            self.running.clear()


class Supervisor:
    """Keeps `processes` children running `backroom worker --in-process --child` with the
    given arguments. Child 0 alone gets `--scheduler` when asked for, so one process per host
    ticks the schedules (the broker makes each tick fire once across hosts anyway).

    First SIGTERM/SIGINT: children stop reserving, finish within `--grace` and hand the rest
    back; a second one: they hand everything back at once. A child that dies with jobs in hand
    (os._exit, a segfault, the OOM killer) is replaced, and the replacement fails those jobs
    at once with the reason, to be retried per their policy. A child whose event loop froze
    with a job past its timeout (a C call holding the GIL) is killed the same way."""

    def __init__(
        self, child_args: Sequence[str], processes: int, *, burst: bool, scheduler: bool
    ) -> None:
        self.child_args = list(child_args)
        self.processes = processes
        self.burst = burst
        self.scheduler = scheduler
        self.lease = _option(self.child_args, "--lease", 60.0)
        self.grace = _option(self.child_args, "--grace", 30.0)
        self._children: dict[int, _Child] = {}
        self._failures: dict[int, int] = {}
        self._orphans: dict[int, list[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._signals = 0
        self._stop_deadline: float | None = None

    # -- children --------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> None:
        command = [sys.executable, "-m", "backroom", "worker", *self.child_args,
                   "--in-process", "--child"]  # fmt: skip
        if self.scheduler and slot == 0:
            command.append("--scheduler")
        if self.burst:
            command.append("--burst")
        reader, writer = os.pipe()
        env = {**os.environ, CHANNEL_ENV: str(writer)}
        orphans = self._orphans.get(slot)
        if orphans:
            env[ORPHANS_ENV] = json.dumps(orphans[:MAX_ORPHANS])
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env,
                                       pass_fds=(writer,))  # fmt: skip
        finally:
            os.close(writer)
        self._children[slot] = _Child(slot, process, reader)
        logger.info("started worker child %d (pid %d)", slot, process.pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        first = self._signals == 1
        self._stop.set()
        if first:
            self._stop_deadline = time.monotonic() + self.grace + STOP_MARGIN_S
        for child in self._children.values():
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM if first else STOP_NOW_SIGNAL)

    def _watch(self, child: _Child) -> None:
        """Kill a child that stopped beating: with a job past its timeout (the job holds the
        GIL, or blocks the event loop), or for longer than a lease (its leases are lost)."""
        if not child.ready or child.process.poll() is not None:
            return
        silent = time.monotonic() - child.last_beat
        now = time.time()
        overdue = {
            job_id
            for job_id, (_, due) in child.held.items()
            if due is not None and now > due + FROZEN_PAST_DEADLINE_S
        }
        if overdue and silent > FROZEN_PAST_DEADLINE_S:
            why = f"a job past its timeout ({', '.join(sorted(overdue))}) froze it"
        elif silent > max(self.lease, 2 * FROZEN_PAST_DEADLINE_S):
            why = f"it has not answered for {silent:.0f} s"
        else:
            return
        logger.error("killing worker child %d (pid %d): %s", child.slot, child.process.pid, why)
        child.overdue = overdue or set(child.running)
        child.killed = why
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()

    def _bury(self, child: _Child, code: int) -> None:
        """A child exited: what it held (if it did not exit cleanly) goes to its replacement."""
        child.read()
        if child.reader is not None:
            os.close(child.reader)
            child.reader = None
        if code in (0, EXIT_RECYCLE) or not child.held:
            return
        pid = child.process.pid
        if child.killed:
            how = f"was killed ({child.killed})"
        elif code < 0:
            how = f"died from signal {-code} ({_signal_name(-code)})"
        else:
            how = f"exited with code {code}"
        orphans = self._orphans.setdefault(child.slot, [])
        for job_id, (attempt_id, due) in child.held.items():
            orphan: dict[str, Any] = {"id": job_id, "attempt_id": attempt_id}
            past_due = due is not None and due < time.time()
            if job_id not in child.running or (child.killed and job_id not in child.overdue):
                orphan["release"] = True  # an innocent bystander: hand it back, uncounted
            elif child.killed and past_due:
                orphan["error"] = ["JobTimeout", "job exceeded its timeout and froze its worker "
                                   f"process (pid {pid}), which was killed"]  # fmt: skip
            else:
                orphan["error"] = ["WorkerCrashed", f"the worker process running this job "
                                   f"(pid {pid}) {how}"]  # fmt: skip
            orphans.append(orphan)
        logger.error("worker child %d (pid %d) %s holding %d job(s); its replacement fails them",
                     child.slot, pid, how, len(child.held))  # fmt: skip

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.processes):
            self._spawn(slot)
        finished: set[int] = set()
        restart_at: dict[int, float] = {}
        while True:
            for slot, child in list(self._children.items()):
                if slot in finished or slot in restart_at:
                    continue
                child.read()
                if child.ready:
                    self._orphans.pop(slot, None)  # the replacement settled them
                self._watch(child)
                code = child.process.poll()
                if code is None:
                    continue
                self._bury(child, code)
                if self._stop.is_set() or (self.burst and code == 0):
                    finished.add(slot)
                    continue
                if code in (0, EXIT_RECYCLE):
                    logger.info("worker child %d (pid %d) asked to be recycled", slot,
                                child.process.pid)  # fmt: skip
                    self._failures[slot] = 0
                    restart_at[slot] = time.monotonic()
                    continue
                stable = time.monotonic() - child.started >= STABLE_CHILD_S
                failures = 1 if stable else self._failures.get(slot, 0) + 1
                self._failures[slot] = failures
                delay = min(RESTART_BACKOFF_MAX_S, 0.1 * 2 ** (failures - 1))
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                logger.error("worker child %d (pid %d) died (%s); restarting in %.1f s",
                             slot, child.process.pid, how, delay)  # fmt: skip
                restart_at[slot] = time.monotonic() + delay
            for slot, when in list(restart_at.items()):
                if self._stop.is_set():
                    finished.add(slot)
                    del restart_at[slot]
                elif time.monotonic() >= when:
                    del restart_at[slot]
                    self._spawn(slot)
            if len(finished) == self.processes:
                break
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self._kill_stragglers()
            time.sleep(TICK_S)
        for child in self._children.values():
            child.process.wait()
        if self._orphans:
            left = sum(len(o) for o in self._orphans.values())
            logger.warning("%d job(s) of dead children return to the queue when their leases "
                           "expire", left)  # fmt: skip
        return 0

    def _kill_stragglers(self) -> None:
        self._stop_deadline = None
        for child in self._children.values():
            if child.process.poll() is None:
                logger.error("worker child %d (pid %d) did not stop within the grace period; "
                             "killing it", child.slot, child.process.pid)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()


def _option(args: Sequence[str], name: str, default: float) -> float:
    """A numeric option's value in the children's command line (the CLI always passes it)."""
    for index, arg in enumerate(args):
        try:
            if arg == name:
                return float(args[index + 1])
            if arg.startswith(name + "="):
                return float(arg.split("=", 1)[1])
        except (IndexError, ValueError):
            break
    return default


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
