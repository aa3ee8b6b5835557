"""The JSON log lines (reporting.JsonLogFormatter) record by record: fields from `extra=`, the
job's id and name, values JSON can't hold (the CLI tests read the same lines from real workers);
and the README's Sentry recipe, run by a real worker against a stand-in for sentry_sdk."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import backroom
from backroom.reporting import JsonLogFormatter
from tests.helpers import envelope_for


def line(name: str, message: str, *args: Any, **extra: Any) -> dict[str, Any]:
    record = logging.getLogger(name).makeRecord(
        name, logging.WARNING, __file__, 1, message, args, None, extra=extra
    )
    text = JsonLogFormatter().format(record)
    assert "\n" not in text  # one line, whatever the message holds
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_extra_fields_are_written_and_the_four_first_fields_never_overwritten() -> None:
    entry = line("backroom.worker", "two\nlines", level="loud", attempt=2, tags=("a", "b"))
    assert (entry["level"], entry["message"]) == ("WARNING", "two\nlines")
    assert (entry["attempt"], entry["tags"]) == (2, ["a", "b"])


def test_a_value_json_cannot_hold_is_written_as_text() -> None:
    entry = line("backroom.web", "x", where=object(), keyed={(1, 2): "pair"}, size=2**70)
    assert entry["where"].startswith("<object object at")
    assert entry["size"] == 2**70 and entry["keyed"] == {"(1, 2)": "pair"}


def test_a_jobs_own_lines_name_the_job_and_fields_a_record_carries_win() -> None:
    assert line("backroom.job.resize", "frame %d", 3)["job"] == "resize"
    own = line("backroom.job.resize", "frame", job="given", job_id="j1")
    assert (own["job_id"], own["job"]) == ("j1", "given")  # what the record carries wins
    assert "job_id" not in line("backroom.worker", "job %s (%s) x", "j1", "resize")  # no guessing


# -- the README's Sentry recipe, run against a stand-in for sentry_sdk ---------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
# what sentry_sdk.capture_exception takes besides the error (Scope.update_from_kwargs)
SENTRY_SCOPE_KEYWORDS = {"user", "level", "extras", "contexts", "tags", "fingerprint"}


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    start = text.index("```python\n", text.index(f"\n{heading}\n")) + len("```python\n")
    return text[start : text.index("```\n", start)]


def test_the_readme_sentry_recipe_reports_failures_dead_jobs_and_rejections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = backroom.App("memory://", source="api")

    @app.job(retries=1, retry_backoff=0.01, tags=("storage",))
    def upload(ctx: backroom.Context, path: str, token: str = "") -> None:
        raise ConnectionError("storage node timed out")

    events: list[tuple[BaseException, dict[str, Any]]] = []

    def capture_exception(error: BaseException | None = None, **scope: Any) -> str:
        assert error is not None and set(scope) <= SENTRY_SCOPE_KEYWORDS, scope
        events.append((error, scope))
        return "event-id"

    sentry_sdk = types.ModuleType("sentry_sdk")
    sentry_sdk.capture_exception = capture_exception  # type: ignore[attr-defined]
    jobs = types.ModuleType("myapp.jobs")
    jobs.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sentry_sdk", sentry_sdk)
    monkeypatch.setitem(sys.modules, "myapp", types.ModuleType("myapp"))
    monkeypatch.setitem(sys.modules, "myapp.jobs", jobs)
    exec(compile(readme_block("### Reporting to Sentry"), str(README), "exec"), {})

    handle = app.enqueue("upload", {"path": "/s/1", "token": "tok-7f3a9c2e1b"}, tags=["edge-1"])
    stray = envelope_for("no_such_job", tags=("edge-2",))
    app.broker.enqueue([stray])  # another program enqueued a job nobody registered
    app.run_worker(burst=True)
    assert handle.status() == "dead"

    by_outcome = {scope["tags"]["backroom.outcome"]: (error, scope) for error, scope in events}
    assert len(events) == 3 and set(by_outcome) == {"retrying", "dead", "rejected"}
    for _, scope in events:
        assert all(isinstance(value, str) for value in scope["tags"].values())  # Sentry's rule
    error, dead = by_outcome["dead"]
    assert isinstance(error, ConnectionError) and dead["level"] == "error"
    assert dead["tags"] == {
        "backroom.job": "upload", "backroom.job_id": handle.id, "backroom.source": "api",
        "backroom.tags": "storage,edge-1", "backroom.outcome": "dead",
    }  # fmt: skip
    context = dead["contexts"]["backroom"]
    assert context["payload"] == {"path": "/s/1", "token": "[redacted]"}
    assert (context["attempt"], context["tags"]) == (2, ["storage", "edge-1"])
    assert dead["fingerprint"] == ["backroom", "upload", "ConnectionError"]
    assert by_outcome["retrying"][1]["level"] == "warning"
    error, rejected = by_outcome["rejected"]
    assert isinstance(error, backroom.UnknownJob) and rejected["level"] == "error"
    assert rejected["tags"]["backroom.job_id"] == stray.id
    assert rejected["tags"]["backroom.tags"] == "edge-2"
