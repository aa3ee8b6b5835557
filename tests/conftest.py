"""Shared fixtures: a real redis-server for the session, and `broker`, one test run per backend
(memory, sqlite, redis). No fakes and no "skip if Redis is absent"."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from backroom.brokers import Broker, connect
from tests.helpers import free_port, redis_answers, wait_until

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so --strict-markers accepts them wherever pyproject stands.
    config.addinivalue_line("markers", "redis: needs the session's real redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, nothing persisted; yields its URL."""
    exe = shutil.which("redis-server") or pytest.fail(
        "redis-server not found on PATH; apt-get install redis-server"
    )
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    command = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
               "--appendonly", "no", "--dir", str(workdir),
               "--logfile", str(workdir / "redis.log")]  # fmt: skip
    with subprocess.Popen(command, stdin=subprocess.DEVNULL) as proc:
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_until(
                lambda: proc.poll() is not None or redis_answers(url),
                deadline_s=10,
                what=f"redis-server to accept connections on port {port}",
            )
            if proc.poll() is not None:
                log = (workdir / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server exited with {proc.returncode}:\n{log}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(params=BACKENDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A connected, empty broker of each kind; purged and closed after the test."""
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'jobs.db'}"}.get(request.param)
    with closing(connect(url or request.getfixturevalue("redis_server"))) as opened:
        opened.purge()  # redis is shared by the session: start from an empty store
        yield opened
        opened.purge()
