"""The app the security tests run: jobs that note every execution (in memory, and in the file
named by $SECURITY_RUNS for subprocess workers), a scheduler-only job, jobs that take secrets.
`build_app` makes a fresh one per test; `app` is the module-level one `backroom` commands load
(its keys come from $BACKROOM_KEYS, its configuration from $BACKROOM_CONFIG)."""

from __future__ import annotations

import os
from typing import Any

import backroom


def build_app(url: str | None = None, *, source: str = "api", **options: Any) -> backroom.App:
    """A fresh App with the security test jobs; `app.runs` lists (job, payload) run here."""
    app = backroom.App(url, source=source, **options)
    runs: list[tuple[str, dict[str, Any]]] = []

    def note(ctx: backroom.Context) -> None:
        runs.append((ctx.job, dict(ctx.payload)))
        path = os.environ.get("SECURITY_RUNS")
        if path:
            with open(path, "a", encoding="utf-8") as ledger:
                ledger.write(f"{ctx.job} {ctx.job_id}\n")

    @app.job(sources={"scheduler"})
    def send_invoices(ctx: backroom.Context, month: str) -> dict[str, int]:
        note(ctx)
        return {"sent": 3}

    @app.job(timeout=60)  # an int timeout: signs as it reads back from the wire (60.0)
    def add(ctx: backroom.Context, a: int, b: int = 0) -> int:
        note(ctx)
        return a + b

    @app.job(retries=1, retry_backoff=0.01)
    def login(ctx: backroom.Context, user: str, password: str) -> None:
        note(ctx)
        raise PermissionError(f"login refused for {user}")

    @app.job(retries=0)
    def leak(ctx: backroom.Context, user: str, password: str) -> None:
        """Careless job code: its exception message and progress echo the secret."""
        note(ctx)
        ctx.progress(0.5, f"trying {user}/{password}")
        raise RuntimeError(f"wrong password {password!r} for {user}")

    @app.job(retries=0)
    def sync(
        ctx: backroom.Context, account: dict[str, Any], urls: list[str] | None = None
    ) -> dict[str, Any]:
        note(ctx)
        return {"account": account["name"], "session_token": "issued-token-0001"}

    @app.job()
    def store(ctx: backroom.Context, user: str, api_key: int) -> None:
        note(ctx)

    @app.job()
    def show_config(ctx: backroom.Context, config: dict[str, Any] | None = None) -> dict[str, Any]:
        note(ctx)
        return {"ctx": ctx.config, "argument": config}

    @app.job()
    def fan_out(ctx: backroom.Context, n: int) -> list[str]:
        note(ctx)
        return [ctx.enqueue("add", {"a": i}).id for i in range(n)]

    @app.job()
    def count(ctx: backroom.Context, result: list[str]) -> int:
        note(ctx)
        return len(result)

    @app.job()
    def echo(ctx: backroom.Context, data: str) -> int:
        note(ctx)
        return len(data)

    app.runs = runs  # type: ignore[attr-defined]
    return app


app = build_app(max_payload_bytes=int(os.environ.get("SECURITY_MAX_PAYLOAD", 1 << 20)))
