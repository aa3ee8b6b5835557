"""The JSON log lines (reporting.JsonLogFormatter) record by record: fields from `extra=`, the
job's id and name, values JSON can't hold. The CLI tests read the same lines from real workers."""

from __future__ import annotations

import json
import logging
from typing import Any

from backroom.reporting import JsonLogFormatter


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


def test_job_id_and_name_come_from_backroom_job_lines_only() -> None:
    entry = line("backroom.worker", "job %s (%s) lost its lease", "j1", "resize")
    assert (entry["job_id"], entry["job"]) == ("j1", "resize")
    own = line("backroom.worker", "job %s (%s) x", "j1", "resize", job_id="mine", job="given")
    assert (own["job_id"], own["job"]) == ("mine", "given")  # what the record carries wins
    assert line("backroom.job.resize", "frame %d", 3)["job"] == "resize"
    assert "job_id" not in line("myapp.billing", "job %s (%s) done", "j1", "resize")
