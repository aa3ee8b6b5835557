"""The background work of a live-streaming company, as backroom jobs: crunch an edge server's
log file into bandwidth per account, email a customer, archive a stream, and the monthly invoice
run that only the scheduler may start. `backroom demo` runs it; read it as a tutorial."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sqlite3
import tempfile
from datetime import date
from pathlib import Path

import backroom

app = backroom.App(source="api")


def _data_dir(ctx: backroom.Context) -> Path:
    """Where the jobs keep the company's data: the worker's own config, never the envelope."""
    path = Path(ctx.config.get("data_dir") or os.environ.get("STREAMING_DATA_DIR")
                or tempfile.gettempdir())  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    return path


def _accounts(ctx: backroom.Context) -> sqlite3.Connection:
    db = sqlite3.connect(_data_dir(ctx) / "accounts.db", timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS bandwidth (account TEXT, day TEXT, server TEXT, "
               "bytes INTEGER, PRIMARY KEY (account, day, server))")  # fmt: skip
    return db


def edge_log(server: str, day: date, lines: int = 400) -> list[str]:
    """A synthetic access log of one edge server for one day: `account bytes path` per line."""
    seed = int(hashlib.sha256(f"{server}/{day}".encode()).hexdigest()[:8], 16)
    rng = random.Random(seed)
    return [
        f"acct-{rng.randrange(40):03d} {rng.randrange(10_000, 5_000_000)} /live/{rng.randrange(9)}"
        for _ in range(lines)
    ]


@app.job(tags=("logs",), retries=3)
def process_logs(ctx: backroom.Context, server: str, day: date) -> dict[str, int]:
    """Parse one edge server's log for one day and attach bandwidth entries to accounts."""
    totals: dict[str, int] = {}
    for line in edge_log(server, day):
        account, size, _path = line.split(" ", 2)
        totals[account] = totals.get(account, 0) + int(size)
    with _accounts(ctx) as db:  # idempotent: a re-run overwrites, never double-counts
        db.executemany(
            "INSERT INTO bandwidth VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET bytes = excluded.bytes",
            [(account, day.isoformat(), server, n) for account, n in totals.items()],
        )
    return {"accounts": len(totals), "bytes": sum(totals.values())}


@app.job(tags=("email",), retries=5, timeout=30)
def send_email(ctx: backroom.Context, to: str, template: str, account: str) -> dict[str, str]:
    """Render and send one customer email (here: written to the outbox folder)."""
    outbox = _data_dir(ctx) / "outbox"
    outbox.mkdir(exist_ok=True)
    message_id = f"{ctx.job_id}@streaming.example"
    (outbox / f"{ctx.job_id}.eml").write_text(
        f"To: {to}\nTemplate: {template}\nAccount: {account}\n"
    )
    return {"message_id": message_id}


@app.job(tags=("archive",), retries=3, retry_backoff=0.2, timeout=120)
async def archive_stream(ctx: backroom.Context, stream_id: str, size_mb: int) -> dict[str, int]:
    """Copy a finished live stream to cold storage in chunks, reporting progress. The stream
    "stream-flaky" meets a storage node that times out twice before it works."""
    if stream_id == "stream-flaky" and ctx.attempt < 3:
        raise ConnectionError(f"storage node timed out on attempt {ctx.attempt}")
    chunks = max(1, size_mb // 64)
    for chunk in range(chunks):
        await asyncio.sleep(0.01)  # stands in for the upload of one chunk
        ctx.progress((chunk + 1) / chunks, f"chunk {chunk + 1} of {chunks}")
    return {"chunks": chunks, "size_mb": size_mb}


@app.job(sources={"scheduler"}, tags=("billing",), retries=3, timeout=600)
def send_invoices(ctx: backroom.Context, month: str) -> dict[str, int]:
    """The monthly invoice run: one invoice per account with bandwidth. Only the scheduler may
    start it, so no web request or script can bill customers twice."""
    with _accounts(ctx) as db:
        rows = db.execute("SELECT account, SUM(bytes) FROM bandwidth GROUP BY account").fetchall()
    for account, total in rows:
        ctx.enqueue("send_email", {"to": f"{account}@customers.example", "template": "invoice",
                                   "account": account})  # fmt: skip
        ctx.logger.debug("invoice for %s: %d bytes", account, total)
    return {"invoices": len(rows)}


app.schedule("send_invoices", cron="0 6 1 * *", payload={"month": "previous"},
             timezone="Europe/Berlin")  # fmt: skip
