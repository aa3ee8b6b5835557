"""`backroom demo`: the streaming example app end to end on the embedded SQLite broker, with no
set-up. Enqueues a few hundred jobs (and a few that must be refused), drains them with a worker
while a progress bar shows it, then prints the per-job-name table."""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backroom.app import App, Handle
from backroom.brokers.base import JobQuery
from backroom.envelope import FINAL_STATES, Envelope, State, new_id
from backroom.errors import BackroomError
from backroom.reporting import stats_summary
from backroom.terminal import stats_table

console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
DEADLINE_S = 120.0


def run_demo(jobs: int = 300, url: str | None = None, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="backroom-demo-"))
    url = url or f"sqlite:///{workdir / 'backroom.db'}"
    from backroom.examples import streaming
    from backroom.worker import Worker

    app = streaming.app
    app.url = url
    app._config = {"data_dir": str(workdir / "data")}
    app.broker.purge()
    console.rule("[bold]backroom demo: a live-streaming company's background work")
    console.print(f"broker: {url}\njobs: {', '.join(app.registry.names())}\n")

    handles = _enqueue_work(app, jobs)
    refused = _refused_at_enqueue(app)
    smuggled = _smuggle_bad_envelopes(app)
    console.print(
        f"\nenqueued {len(handles)} jobs, plus {len(smuggled)} envelopes written "
        "straight into the broker by 'another program' that the worker must reject\n"
    )

    logging.getLogger("backroom").setLevel(logging.ERROR)  # the table tells the story
    worker = Worker(app, concurrency=8, lease=30, burst=False)
    thread = threading.Thread(target=worker.run, name="backroom-demo-worker", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        _watch(app)
    finally:
        worker.stop()
        thread.join(timeout=30)
    elapsed = time.monotonic() - started

    summary = stats_summary(app)
    console.print()
    console.print(
        stats_table(summary, title=f"{_finished(summary)} jobs drained in {elapsed:.1f} s"),
        markup=False,  # job names and rejection reasons are data
    )
    _explain(app, summary, refused, handles)
    if keep:
        console.print(f"\nthe demo database is kept: {url}\n  backroom jobs --app "
                      f"backroom.examples.streaming:app --url {url}")  # fmt: skip
    return 0


def _finished(summary: dict[str, Any]) -> int:
    return sum(sum(row["counts"][str(s)] for s in FINAL_STATES) for row in summary["jobs"])


def _enqueue_work(app: App, jobs: int) -> list[Handle]:
    servers = [f"edge-{n}" for n in range(1, 9)]
    day0 = date(2026, 11, 1)
    n_logs = max(1, int(jobs * 0.7))
    n_mail = max(1, int(jobs * 0.2))
    n_archive = max(1, jobs - n_logs - n_mail - 2)
    days = [(day0 + timedelta(days=i // len(servers))).isoformat() for i in range(n_logs)]
    log_payloads = [{"server": servers[i % len(servers)], "day": days[i]} for i in range(n_logs)]
    handles: list[Handle] = []
    # many payloads, one transaction: checked first, then enqueued in one round trip
    for server in servers:
        batch = [p for p in log_payloads if p["server"] == server]
        handles += app.enqueue_many("process_logs", batch, tags=[server])
    handles += app.enqueue_many("send_email", [
        {"to": f"viewer{i}@customers.example", "template": "welcome", "account": f"acct-{i:03d}"}
        for i in range(n_mail)
    ])  # fmt: skip
    for i in range(n_archive):
        handles.append(app.enqueue("archive_stream", {"stream_id": f"stream-{i}",
                                                      "size_mb": 64 * (1 + i % 8)}))  # fmt: skip
    flaky = app.enqueue("archive_stream", {"stream_id": "stream-flaky", "size_mb": 256},
                        tags=["flaky"])  # fmt: skip
    handles.append(flaky)
    # the invoice run is the scheduler's alone; here the demo speaks as the scheduler
    handles.append(app.enqueue("send_invoices", {"month": "2026-10"}, source="scheduler",
                               delay=1.0))  # fmt: skip
    console.print(f"[green]enqueued[/] {n_logs} process_logs (one per edge server and day, "
                  f"{len(servers)} transactions), {n_mail} send_email (one transaction), "
                  f"{n_archive + 1} archive_stream (one of them flaky), 1 send_invoices "
                  "(as the scheduler, in 1 s)")  # fmt: skip
    return handles


def _refused_at_enqueue(app: App) -> list[str]:
    """What the producer-side checks refuse at once, before anything reaches the queue."""
    attempts: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("process_log", {"server": "edge-1", "day": "2026-11-21"}, {}),
        ("send_invoices", {"month": "2026-10"}, {"source": "api"}),
        ("process_logs", {"server": "edge-1", "day": "2026-11-31"}, {}),
    ]
    messages = []
    console.print("\n[bold]refused at enqueue[/] (the caller gets the error at once):")
    for job, payload, options in attempts:
        try:
            app.enqueue(job, payload, **options)
        except BackroomError as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
            console.print(f"  [red]{type(exc).__name__}[/]: {exc}", markup=True)
    return messages


def _smuggle_bad_envelopes(app: App) -> list[str]:
    """Envelopes from an old deploy or another language skip the producer's checks; the worker
    checks again and rejects them with the reason."""
    now = time.time()
    bad = [
        Envelope(id=new_id(), job="transcode_vod", source="api", payload={"video": "v1"},
                 created_at=now),
        Envelope(id=new_id(), job="send_invoices", source="api", payload={"month": "2026-10"},
                 created_at=now),
        Envelope(id=new_id(), job="process_logs", source="api",
                 payload={"server": "edge-2", "day": "yesterday"}, created_at=now),
    ]  # fmt: skip
    return app.broker.enqueue(bad)


def _watch(app: App) -> None:
    """Show the drain until nothing is scheduled, queued, running or retrying (the invoice run
    adds its own emails on the way, so the bar's total grows)."""
    columns = (TextColumn("[bold]draining"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())  # fmt: skip
    deadline = time.monotonic() + DEADLINE_S
    live = ("scheduled", "queued", "running", "retrying")
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("jobs", total=None, detail="")
        while True:
            counts: dict[str, int] = {}
            for job in app.broker.stats().jobs.values():
                for state, n in job.counts.items():
                    counts[state] = counts.get(state, 0) + n
            done = sum(counts.get(str(s), 0) for s in FINAL_STATES)
            detail = ", ".join(f"{s} {counts[s]}" for s in live if counts.get(s))
            bar.update(task, total=sum(counts.values()), completed=done, detail=detail)
            if not any(counts.get(s) for s in live) or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # a display refresh, not synchronisation


def _explain(app: App, summary: dict[str, Any], refused: list[str], handles: list[Handle]) -> None:
    flaky = next(h for h in handles if h.info()["tags"] == ["archive", "flaky"])
    info = flaky.info()
    console.print(
        f"\n[bold]retried[/]: archive_stream stream-flaky failed twice "
        f"(ConnectionError), then {info['state']} on attempt {info['attempts']}"
    )
    rejected = app.broker.jobs(JobQuery(state=State.REJECTED, limit=10))
    console.print(
        "[bold]rejected in the worker[/] (never run, never retried, on_reject hooks told):"
    )
    for record in rejected:
        console.print(
            f"  {record.job} from {record.envelope.source!r}: {record.reason}", markup=False
        )
    invoices = [h for h in handles if h.info()["job"] == "send_invoices"]
    if invoices:
        console.print(
            f"[bold]send_invoices[/] (source scheduler) returned {invoices[0].result(timeout=30)}"
        )
    console.print(
        "\nnext: define your own jobs (README, five-minute tutorial), run "
        "`backroom worker --app yourmodule:app`, and watch them in `backroom dashboard`."
    )
