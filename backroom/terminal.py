"""Terminal output with rich: the tables of `backroom stats/jobs/registry/status` and the demo."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(markup=False, width=None if sys.stdout.isatty() else 140)  # names are data


def seconds(value: float | None) -> str:
    """A duration for people: 840 µs, 12.3 ms, 4.20 s, 3.0 min."""
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def when(value: float | None) -> str:
    return "-" if value is None else datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def stats_table(summary: dict[str, Any], title: str = "jobs by name") -> Table:
    """Per job name; "recovered" counts the jobs requeued (or ended) after their lease ran out."""
    table = Table(title=title, title_justify="left")
    table.add_column("job", no_wrap=True)
    table.add_column("jobs by state")
    for header in ("p50 run", "p95 run", "max run", "p95 wait", "retries", "recovered"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("rejections by reason")
    for row in summary["jobs"]:
        states = ", ".join(f"{n} {state}" for state, n in row["counts"].items() if n) or "-"
        reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(row["rejections"].items()))
        run, wait = row["run_time"], row["wait_time"]
        table.add_row(
            row["job"], states, seconds(run["p50"]), seconds(run["p95"]), seconds(run["max"]),
            seconds(wait["p95"]), str(row["retries"]), str(row["recoveries"]), reasons or "-",
        )  # fmt: skip
    return table


def tags_table(summary: dict[str, Any]) -> Table:
    table = Table(title="jobs by tag", title_justify="left")
    table.add_column("tag", no_wrap=True)
    table.add_column("jobs")
    table.add_column("outcomes")
    for header in ("running", "retries", "failure rate", "p50 run", "p95 run", "max run",
                   "p95 wait"):  # fmt: skip
        table.add_column(header, justify="right", no_wrap=True)
    for row in summary["tags"]:
        outcomes = ", ".join(f"{n} {state}" for state, n in row["counts"].items() if n) or "-"
        run, wait = row["run_time"], row["wait_time"]
        table.add_row(
            row["tag"], ", ".join(row["jobs"]) or "-", outcomes, str(row["running"]),
            str(row["retries"]), f"{row['failure_rate']:.1%}", seconds(run["p50"]),
            seconds(run["p95"]), seconds(run["max"]), seconds(wait["p95"]),
        )  # fmt: skip
    return table


def print_stats(summary: dict[str, Any]) -> None:
    console.print(stats_table(summary))
    if summary.get("tags"):
        console.print(tags_table(summary), markup=False)
    if summary.get("other_tags"):
        console.print(f"tags past the first {summary['max_tags']} are counted together: "
                      f"{summary['other_tags']['total']} outcomes", markup=False)  # fmt: skip
    if summary["queues"] or summary["paused"]:
        depth = ", ".join(f"{q}: {n}" for q, n in sorted(summary["queues"].items())) or "empty"
        paused = f"; paused: {', '.join(summary['paused'])}" if summary["paused"] else ""
        console.print(f"queued by queue: {depth}{paused}")
    print_schedules(summary["schedules"])


def print_schedules(schedules: list[dict[str, Any]]) -> None:
    for schedule in schedules:
        console.print(f"schedule {schedule['name']} ({schedule['cron']} {schedule['timezone']})"
                      f" -> {schedule['job']}, next run {when(schedule['next_run'])}")  # fmt: skip


def print_jobs(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(rows)} most recent jobs", title_justify="left")
    for header in ("id", "job", "state", "tags", "source", "attempts", "created", "run time",
                   "error / reason"):  # fmt: skip
        table.add_column(header)
    for row in rows:
        error = row["error"]["type"] + ": " + row["error"]["message"] if row["error"] else ""
        table.add_row(row["id"], row["job"], row["state"], ",".join(row["tags"]), row["source"],
                      str(row["attempts"]), when(row["created_at"]), seconds(row["run_time"]),
                      (row["reason"] or error)[:80])  # fmt: skip
    console.print(table)


def print_info(info: dict[str, Any]) -> None:
    table = Table(show_header=False, title=f"job {info['id']}", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    progress = "-" if info["progress"] is None else f"{info['progress']:.0%}"
    if info["progress_message"]:
        progress += f" {info['progress_message']}"
    for key, value in (
        ("job", info["job"]), ("state", info["state"]), ("source", info["source"]),
        ("tags", ", ".join(info["tags"]) or "-"), ("queue", info["queue"]),
        ("attempts", f"{info['attempts']} of {info['max_retries'] + 1}"), ("progress", progress),
        ("created", when(info["created_at"])), ("started", when(info["started_at"])),
        ("finished", when(info["finished_at"])), ("wait time", seconds(info["wait_time"])),
        ("run time", seconds(info["run_time"])),
        ("payload", json.dumps(info["payload"], sort_keys=True)),
        ("result", json.dumps(info["result"])), ("reason", info["reason"] or "-"),
    ):  # fmt: skip
        table.add_row(key, value)
    console.print(table, markup=False)
    if info["error"]:
        console.print(f"{info['error']['type']}: {info['error']['message']}", markup=False)
        console.print(info["error"]["traceback"], markup=False, highlight=False)


def print_registry(entries: list[dict[str, Any]]) -> None:
    table = Table(title="registered jobs", title_justify="left")
    for header in ("job", "queue", "sources", "retries", "timeout", "tags", "payload fields"):
        table.add_column(header)
    for entry in entries:
        fields = entry["payload_schema"].get("properties", {})
        required = set(entry["payload_schema"].get("required", []))
        described = ", ".join(
            f"{name}{'' if name in required else '?'}: {_type_name(schema)}"
            for name, schema in fields.items()
        )
        table.add_row(entry["name"], entry["queue"],
                      ", ".join(entry["sources"]) if entry["sources"] else "any",
                      str(entry["retries"]), seconds(entry["timeout"]), ", ".join(entry["tags"]),
                      described)  # fmt: skip
    console.print(table)


def _type_name(schema: dict[str, Any]) -> str:
    if "type" in schema:
        return str(schema["type"])
    if "anyOf" in schema:
        return " | ".join(_type_name(s) for s in schema["anyOf"])
    return "any"
