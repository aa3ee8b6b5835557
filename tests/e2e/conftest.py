"""Helpers for end-to-end tests: real `backroom worker` processes on real brokers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps.ledger import init_ledger

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Starts `backroom worker` processes; kills whatever is left at the end of the test."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "backroom", "worker", *args],
                                env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL)  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEDGER_DB": str(tmp_path / "ledger.db")}
    init_ledger(env["LEDGER_DB"])
    pool = Workers(env)
    yield pool
    pool.stop_all()
