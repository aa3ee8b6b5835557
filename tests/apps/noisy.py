"""A test app whose worker logs a line of every kind: a job logging through ctx.logger with a
field of its own, a job that fails until it is dead, and an on_dead hook that raises (logged
with its traceback). The CLI tests read those lines as text or as JSON."""

from __future__ import annotations

import backroom

app = backroom.App(source="api")


@app.job()
def parse(ctx: backroom.Context, lines: int) -> int:
    ctx.logger.info("parsed %d lines", lines, extra={"lines": lines})
    ctx.logger.debug("parser details: %d", lines)  # seen with -v only
    return lines


@app.job(retries=1, retry_backoff=0.01)
def always_fails(ctx: backroom.Context, message: str) -> None:
    raise RuntimeError(message)


@app.on_dead
def tracker_down(envelope: backroom.Envelope, error: BaseException) -> None:
    raise LookupError("the error tracker is down")
