"""Fixtures for the dashboard and HTTP API: a small app of jobs on memory:// and sqlite://, a
TestClient for it, and a real uvicorn server in a thread for the browser tests."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.exceptions import StarletteDeprecationWarning

import backroom
from backroom.web import create_app
from backroom.web.auth import TokenSpec
from tests.helpers import free_port, wait_until

with warnings.catch_warnings():
    # starlette.testclient asks for httpx2 at import time; httpx is what the test extra installs.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient as TestClient

SECRET = "hunter2-correct-horse"


def build_app(url: str) -> backroom.App:
    """Jobs like the demo's: tagged ones, a scheduler-only one, one that always fails."""
    app = backroom.App(url, source="api", config={})

    @app.job(tags=("logs",))
    def process_logs(ctx: backroom.Context, server: str, day: str) -> dict[str, str]:
        ctx.progress(0.5, "half the lines parsed")
        return {"server": server}

    @app.job(tags=("email",), queue="mail")
    def send_email(ctx: backroom.Context, to: str, password: str = "") -> str:
        return f"sent to {to}"

    @app.job(sources={"scheduler"})
    def send_invoices(ctx: backroom.Context, month: str) -> dict[str, int]:
        return {"sent": 3}

    @app.job(retries=0)
    def always_fails(ctx: backroom.Context, message: str) -> None:
        raise ValueError(message)

    @app.job(retries=0, tags=("storage",))
    def upload(ctx: backroom.Context, path: str) -> str:
        if ctx.config.get("storage_down"):  # a test flips this to make the job fail or succeed
            raise ConnectionError("storage node timed out")
        return f"uploaded {path}"

    app.schedule("send_invoices", cron="0 6 1 * *", payload={"month": "previous"})
    return app


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[backroom.App]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'web.db'}"
    application = build_app(url)
    yield application
    application.close()


@pytest.fixture
def client(app: backroom.App) -> Iterator[TestClient]:
    with TestClient(create_app(app, tokens={})) as test_client:
        yield test_client


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def client_for(app: backroom.App) -> Iterator[ClientFactory]:
    """A TestClient with the given tokens (and create_app keywords)."""
    opened: list[TestClient] = []

    def make(tokens: TokenSpec | None = None, **options: Any) -> TestClient:
        test_client = TestClient(create_app(app, tokens=tokens, **options))
        opened.append(test_client)
        return test_client

    yield make
    for test_client in opened:
        test_client.close()


class LiveServer:
    """The dashboard served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app: backroom.App, tokens: TokenSpec | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(
            create_app(app, tokens={} if tokens is None else tokens),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws="none",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(),
            deadline_s=10,
            what="the dashboard server to start",
        )
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
