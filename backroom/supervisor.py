"""The supervisor: runs P child worker processes and no job code, so a job that hangs, leaks or
crashes its process never takes the worker down. It restarts children that die or ask to be
recycled, forwards SIGTERM for a graceful stop, and exits 0 once burst children are done."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger("backroom.supervisor")

EXIT_RECYCLE = 3
RESTART_BACKOFF_MAX_S = 10.0


class Supervisor:
    """Keeps `processes` children running `backroom worker --in-process --child` with the
    given arguments. Child 0 alone gets `--scheduler` when asked for, so one process per host
    ticks the schedules (the broker makes each tick fire once across hosts anyway)."""

    def __init__(
        self, child_args: Sequence[str], processes: int, *, burst: bool, scheduler: bool
    ) -> None:
        self.child_args = list(child_args)
        self.processes = processes
        self.burst = burst
        self.scheduler = scheduler
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._failures: dict[int, int] = {}
        self._stop = threading.Event()
        self._signals = 0

    def _spawn(self, slot: int) -> None:
        command = [sys.executable, "-m", "backroom", "worker", *self.child_args,
                   "--in-process", "--child"]  # fmt: skip
        if self.scheduler and slot == 0:
            command.append("--scheduler")
        if self.burst:
            command.append("--burst")
        self._children[slot] = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        logger.info("started worker child %d (pid %d)", slot, self._children[slot].pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        self._stop.set()
        for child in self._children.values():
            if child.poll() is None:
                # the first signal asks for a graceful stop; a second one for an immediate one
                child.send_signal(signal.SIGTERM)

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
                code = child.poll()
                if code is None:
                    continue
                if self._stop.is_set() or (self.burst and code == 0):
                    finished.add(slot)
                    continue
                if code == EXIT_RECYCLE:
                    logger.info("worker child %d (pid %d) asked to be recycled", slot, child.pid)
                    self._failures[slot] = 0
                    restart_at[slot] = time.monotonic()
                else:
                    failures = self._failures.get(slot, 0) + 1
                    self._failures[slot] = failures
                    delay = min(RESTART_BACKOFF_MAX_S, 0.1 * 2 ** (failures - 1))
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    logger.error("worker child %d (pid %d) died (%s); restarting in %.1f s; its "
                                 "jobs return to the queue when their leases expire",
                                 slot, child.pid, how, delay)  # fmt: skip
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
            self._stop.wait(0.05)
        for child in self._children.values():
            child.wait()
        return 0
