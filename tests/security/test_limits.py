"""Limits and hostile bytes in the broker. A payload over the limit (1 MiB by default) fails at
enqueue with a clear PayloadTooLarge; one nested absurdly deep fails as InvalidPayload. Bytes
that bypass the App (crafted envelopes, garbage written straight into the SQLite jobs table)
are rejected with a reason, and the worker keeps running and processes the next good job."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import backroom
from backroom.envelope import Envelope, new_id
from backroom.errors import InvalidPayload, PayloadTooLarge
from tests.security.conftest import APP, backroom_cli
from tests.security.secure_app import build_app

MiB = 1 << 20


def test_the_default_limit_is_one_mebibyte_of_payload_json() -> None:
    app = build_app("memory://")
    assert app.max_payload_bytes == MiB
    overhead = len(b'{"data":""}')
    assert app.enqueue("echo", {"data": "x" * (MiB - overhead)}).result is not None  # exactly 1 MiB
    with pytest.raises(PayloadTooLarge) as caught:
        app.enqueue("echo", {"data": "x" * (MiB - overhead + 1)})
    assert str(caught.value) == (
        f"payload for 'echo' is {MiB + 1} bytes, over the limit of {MiB} bytes; "
        "store large data elsewhere and pass a reference"
    )
    assert (caught.value.size, caught.value.limit) == (MiB + 1, MiB)


def test_the_limit_is_configurable_and_checked_before_anything_is_stored() -> None:
    app = build_app("memory://", max_payload_bytes=64)
    app.enqueue("echo", {"data": "x" * 40})
    with pytest.raises(PayloadTooLarge, match="over the limit of 64 bytes"):
        app.enqueue_many("echo", [{"data": "ok"}, {"data": "x" * 100}])
    assert app.broker.stats().queues.get("default", 0) == 1  # the batch stored nothing
    big = build_app("memory://", max_payload_bytes=8 * MiB)
    big.enqueue("echo", {"data": "x" * (2 * MiB)})


def test_a_payload_nested_absurdly_deep_is_refused_at_enqueue() -> None:
    app = build_app("memory://")
    deep: object = "leaf"
    for _ in range(150):
        deep = {"next": deep}
    with pytest.raises(InvalidPayload, match="nests more than 100 levels deep"):
        app.enqueue("sync", {"account": deep})


def test_the_cli_prints_one_clear_line_for_a_payload_over_the_limit(url: str) -> None:
    payload = json.dumps({"data": "x" * 2000})
    proc = backroom_cli("enqueue", "--app", APP, "echo", payload, url=url,
                        env={"SECURITY_MAX_PAYLOAD": "1000"})  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        "backroom: payload for 'echo' is 2011 bytes, over the limit of 1000 bytes; "
        "store large data elsewhere and pass a reference\n"
    )


def test_an_oversized_envelope_written_around_the_app_is_rejected_in_the_worker(url: str) -> None:
    app = build_app(url, max_payload_bytes=1000)
    oversized = Envelope(id=new_id(), job="echo", source="api", payload={"data": "x" * 5000})
    app.broker.enqueue([oversized])
    good = app.enqueue("echo", {"data": "fine"})
    assert app.run_worker(burst=True) == 0
    assert app.handle(oversized.id).info()["reason"] == (
        "payload too large: payload for 'echo' is 5011 bytes, over the limit of 1000 bytes; "
        "store large data elsewhere and pass a reference"
    )
    assert good.result(timeout=5) == 4


def _deep(levels: int) -> bytes:
    return (
        b'{"id":"a","job":"echo","source":"api","payload":{"x":'
        + b"[" * levels
        + b"]" * levels
        + b"}}"
    )


VALID = b'{"id":"ID","job":"echo","source":"api","payload":{"data":"abc"}}'
GARBAGE: dict[str, object] = {
    "empty": b"",
    "truncated": VALID[: len(VALID) // 2],
    "not-json": b"<html>502 Bad Gateway</html>",
    "binary": b"\xff\xfe\x00\x01\x80",
    "nul-bytes": b'{"id":"a\x00","job":"echo"\x00}',
    "json-array": b'["echo", {"data": "abc"}]',
    "json-null": b"null",
    "missing-fields": b'{"job":"echo"}',
    "wrong-types": b'{"id":1,"job":["echo"],"source":{},"payload":"abc","priority":"high"}',
    "payload-not-object": b'{"id":"a","job":"echo","source":"api","payload":[1,2]}',
    "huge-int": b'{"id":"a","job":"echo","source":"api","priority":' + b"9" * 400 + b"}",
    "out-of-range-float": b'{"id":"a","job":"echo","source":"api","eta":1e999}',
    "bad-unique-mode": b'{"id":"a","job":"echo","source":"api","unique_for":"forever"}',
    "empty-names": b'{"id":"","job":"","source":""}',
    "deep-payload": _deep(150),
    "stack-bomb": _deep(200_000),
    "text-column": "not even bytes {",
    "integer-column": 42,
    "real-column": 1.5,
}


def _write_garbage(db_path: Path, app: backroom.App) -> dict[str, str]:
    """One placeholder job per kind of garbage, its envelope column then overwritten."""
    ids = {}
    for name in GARBAGE:
        ids[name] = new_id()
    app.broker.enqueue([Envelope(id=i, job="echo", source="api", payload={"data": "placeholder"})
                        for i in ids.values()])  # fmt: skip
    with sqlite3.connect(db_path) as db:
        db.executemany("UPDATE jobs SET envelope = ? WHERE id = ?",
                       [(GARBAGE[name], job_id) for name, job_id in ids.items()])  # fmt: skip
    return ids


def test_garbage_in_the_jobs_table_is_rejected_and_the_worker_keeps_going(
    url: str, db_path: Path
) -> None:
    app = build_app(url)
    before = app.enqueue("echo", {"data": "before"})
    ids = _write_garbage(db_path, app)
    after = app.enqueue("echo", {"data": "after!"})

    assert app.run_worker(burst=True) == 0

    assert (before.result(timeout=5), after.result(timeout=5)) == (6, 6)
    for name, job_id in ids.items():
        info = app.handle(job_id).info()  # a record whose envelope is garbage still shows
        assert info["state"] == "rejected", name
        assert info["reason"].startswith("malformed envelope: "), (name, info["reason"])
    assert app.runs == [("echo", {"data": "before"}), ("echo", {"data": "after!"})]  # type: ignore[attr-defined]
    rejections = app.broker.stats().jobs["echo"].rejections
    assert rejections == {"malformed envelope": len(GARBAGE)}
    jobs = backroom_cli("jobs", "--app", APP, "--state", "rejected", "--json", url=url)
    assert jobs.returncode == 0 and len(json.loads(jobs.stdout)) == len(GARBAGE), jobs.stderr


def test_a_subprocess_worker_survives_garbage_and_runs_the_good_jobs(
    url: str, db_path: Path, runs_file: Path
) -> None:
    app = build_app(url)
    ids = _write_garbage(db_path, app)
    good = app.enqueue("echo", {"data": "good"})
    app.close()
    proc = backroom_cli("worker", "--app", APP, "--burst", url=url,
                        env={"SECURITY_RUNS": str(runs_file)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert runs_file.read_text().split() == ["echo", good.id]
    jobs = backroom_cli("jobs", "--app", APP, "--state", "rejected", "--json", url=url)
    assert sorted(job["id"] for job in json.loads(jobs.stdout)) == sorted(ids.values())
