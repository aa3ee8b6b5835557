"""Fixtures for the security tests: a SQLite file broker per test, a clean environment (no
ambient BACKROOM_KEYS or BACKROOM_SECRET_FIELDS leaking in), and subprocess `backroom` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.security.secure_app:app"
SECURITY_ENV = ("BACKROOM_KEYS", "BACKROOM_KEYS_FILE", "BACKROOM_SECRET_FIELDS", "BACKROOM_CONFIG")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


def backroom_cli(
    *args: str, url: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m backroom ARGS` with the test app on PATH and BACKROOM_URL set."""
    full = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
    full.update({"PYTHONPATH": str(ROOT), "BACKROOM_URL": url, **(env or {})})
    return subprocess.run([sys.executable, "-m", "backroom", *args], capture_output=True,
                          text=True, env=full, cwd=ROOT, timeout=timeout)  # fmt: skip


@pytest.fixture
def runs_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "runs.txt"
    path.touch()
    yield path
