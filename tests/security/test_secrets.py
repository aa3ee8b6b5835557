"""Secrets stay out of sight: payload fields that look secret are masked in App.describe (what
status, info, `backroom jobs` and the HTTP API show), in the envelope error hooks receive, and
in messages that echo them (a rejection reason, a job's exception, its progress message); the
worker logs no payload. `ctx.config` is the worker's own and can't be set from an envelope."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import backroom
from backroom.envelope import Envelope, new_id
from backroom.security import REDACTED, Redactor
from tests.security.conftest import APP, backroom_cli
from tests.security.secure_app import build_app

PASSWORD = "hunter2-Zq8v"
TOKEN = "tok-5c1e-77aa"
LONG_KEY = "sk-live-" + "0123456789abcdef" * 6  # longer than an error message shows in full


def everything_shown(app: backroom.App, job_id: str) -> str:
    return json.dumps(app.handle(job_id).info())


def test_redaction_masks_secret_fields_at_any_depth_and_url_passwords() -> None:
    redactor = Redactor()
    payload = {
        "user": "ada", "password": PASSWORD, "Api-Key": 12345, "nested": {"auth_token": [TOKEN]},
        "accounts": [{"name": "x", "client_secret": {"value": TOKEN}}, "plain"],
        "dsn": f"postgres://ada:{PASSWORD}@db.internal:5432/app", "passenger": "ok-to-mask",
    }  # fmt: skip
    assert redactor.redact(payload) == {
        "user": "ada", "password": REDACTED, "Api-Key": REDACTED,
        "nested": {"auth_token": REDACTED},
        "accounts": [{"name": "x", "client_secret": REDACTED}, "plain"],
        "dsn": f"postgres://ada:{REDACTED}@db.internal:5432/app", "passenger": REDACTED,
    }  # fmt: skip
    assert payload["password"] == PASSWORD  # a copy: the original is untouched


def test_the_secret_fields_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    names = backroom.App("memory://", secret_fields=["ssn", "iban"])
    assert names.redact({"ssn": "1", "IBAN_number": "2", "password": "3"}) == {
        "ssn": REDACTED, "IBAN_number": REDACTED, "password": "3"
    }  # fmt: skip
    pattern = backroom.App("memory://", secret_fields=r"^pin$")
    assert pattern.redact({"pin": 1, "pinned": 2}) == {"pin": REDACTED, "pinned": 2}
    monkeypatch.setenv("BACKROOM_SECRET_FIELDS", "card")
    assert backroom.App("memory://").redact({"card": 1, "token": 2}) == {
        "card": REDACTED, "token": 2
    }  # fmt: skip


def test_redaction_survives_hostile_nesting() -> None:
    deep: Any = {"password": PASSWORD}
    for _ in range(5000):
        deep = {"next": deep}
    shown = json.dumps(Redactor().redact(deep))  # no RecursionError
    assert PASSWORD not in shown


def test_info_and_describe_never_show_a_secret_at_any_stage(url: str) -> None:
    app = build_app(url)
    login = app.enqueue("login", {"user": "ada", "password": PASSWORD})
    sync = app.enqueue("sync", {
        "account": {"name": "acme", "credentials": {"token": TOKEN}},
        "urls": [f"https://bot:{PASSWORD}@git.example/acme.git"],
    })  # fmt: skip
    assert PASSWORD not in everything_shown(app, login.id)  # queued
    app.run_worker(burst=True)
    assert login.status() == "dead" and sync.status() == "succeeded"
    info = login.info()
    assert info["payload"] == {"user": "ada", "password": REDACTED}
    assert info["error"]["message"] == "login refused for ada"
    for job_id in (login.id, sync.id):
        shown = everything_shown(app, job_id)
        assert PASSWORD not in shown and TOKEN not in shown
    assert sync.info()["result"] == {"account": "acme", "session_token": REDACTED}
    assert sync.result() == {"account": "acme", "session_token": "issued-token-0001"}


def test_secrets_echoed_by_careless_job_code_are_masked_where_jobs_are_shown(url: str) -> None:
    app = build_app(url)
    handle = app.enqueue("leak", {"user": "ada", "password": PASSWORD})
    app.run_worker(burst=True)
    info = handle.info()
    assert info["error"]["type"] == "RuntimeError"
    assert info["error"]["message"] == f"wrong password '{REDACTED}' for ada"
    assert (
        PASSWORD not in info["error"]["traceback"] and "RuntimeError" in info["error"]["traceback"]
    )
    assert info["progress_message"] == f"trying ada/{REDACTED}"


@pytest.mark.parametrize("secret", [PASSWORD, LONG_KEY], ids=["short", "cut-short"])
def test_a_rejection_reason_that_quotes_a_secret_is_masked(url: str, secret: str) -> None:
    app = build_app(url)
    # api_key must be an int: the worker's reason quotes the bad value (cut at ~60 characters)
    smuggled = Envelope(id=new_id(), job="store", source="api",
                        payload={"user": "ada", "api_key": secret})  # fmt: skip
    app.broker.enqueue([smuggled])
    app.run_worker(burst=True)
    info = app.handle(smuggled.id).info()
    assert info["state"] == "rejected"
    assert info["reason"].startswith("invalid payload: field 'api_key' expects a valid integer")
    assert secret[:8] not in json.dumps(info)


def test_error_hooks_receive_the_envelope_with_its_secrets_redacted(url: str) -> None:
    app = build_app(url)
    seen: list[tuple[str, str, dict[str, Any]]] = []
    app.on_failure(lambda envelope, error: seen.append(("failure", envelope.job, envelope.payload)))
    app.on_dead(lambda envelope, error: seen.append(("dead", envelope.job, envelope.payload)))
    app.on_reject(lambda envelope, error: seen.append(("reject", envelope.job, envelope.payload)))
    app.enqueue("login", {"user": "ada", "password": PASSWORD})  # retries=1: two failures
    app.broker.enqueue([Envelope(id=new_id(), job="store", source="api",
                                 payload={"user": "ada", "api_key": TOKEN})])  # fmt: skip
    app.run_worker(burst=True)
    assert sorted((kind, job) for kind, job, _ in seen) == [
        ("dead", "login"), ("failure", "login"), ("failure", "login"), ("failure", "store"),
        ("reject", "store"),
    ]  # fmt: skip
    for kind, job, payload in seen:
        secret_field = "api_key" if job == "store" else "password"
        assert payload == {"user": "ada", secret_field: REDACTED}, kind


def test_the_worker_logs_no_payload(url: str, caplog: pytest.LogCaptureFixture) -> None:
    app = build_app(url)
    app.enqueue("login", {"user": "ada", "password": PASSWORD})
    app.enqueue("sync", {"account": {"name": "acme", "token": TOKEN}})
    app.broker.enqueue([Envelope(id=new_id(), job="send_invoices", source="api",
                                 payload={"month": "x", "password": PASSWORD})])  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        app.run_worker(burst=True)
    logged = caplog.text
    assert "login refused for ada" in logged and "rejected job" in logged  # it did log
    assert PASSWORD not in logged and TOKEN not in logged


def test_the_worker_logs_no_secret_echoed_in_a_reason_or_an_exception(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(url)
    app.enqueue("leak", {"user": "ada", "password": PASSWORD})
    app.broker.enqueue([Envelope(id=new_id(), job="store", source="api",
                                 payload={"user": "ada", "api_key": TOKEN})])  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        app.run_worker(burst=True)
    assert "wrong password" in caplog.text and "rejected job" in caplog.text
    assert PASSWORD not in caplog.text and TOKEN not in caplog.text


def test_backroom_status_and_jobs_never_print_a_secret(url: str) -> None:
    producer = build_app(url)
    queued = producer.enqueue("login", {"user": "ada", "password": PASSWORD})
    leaked = producer.enqueue("leak", {"user": "ada", "password": PASSWORD})
    synced = producer.enqueue("sync", {"account": {"name": "acme", "api_key": TOKEN}})
    producer.run_worker(burst=True)
    producer.close()
    outputs = []
    for job_id, extra in ((queued.id, ()), (leaked.id, ()), (synced.id, ("--json",))):
        proc = backroom_cli("status", "--app", APP, job_id, *extra, url=url)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    proc = backroom_cli("jobs", "--app", APP, "--json", url=url)
    outputs.append(proc.stdout + proc.stderr)
    assert "ada" in outputs[0] and "wrong password" in outputs[1] and "acme" in outputs[2]
    assert len(json.loads(proc.stdout)) == 3  # the commands did show the jobs
    for text in outputs:
        assert PASSWORD not in text and TOKEN not in text


def test_ctx_config_is_the_workers_and_no_envelope_can_set_it(url: str, db_path: Path) -> None:
    app = build_app(url, config={"region": "eu", "smtp_password": "worker-only"})
    attacker = {"region": "attacker", "smtp_host": "evil.example"}
    as_argument = app.enqueue("show_config", {"config": attacker})
    as_field = Envelope(id=new_id(), job="show_config", source="api", payload={})
    app.broker.enqueue([as_field])
    with sqlite3.connect(db_path) as db:  # an extra top-level "config" field, as raw JSON
        raw = json.loads(db.execute("SELECT envelope FROM jobs WHERE id = ?",
                                    (as_field.id,)).fetchone()[0])  # fmt: skip
        raw["config"] = attacker
        db.execute("UPDATE jobs SET envelope = ? WHERE id = ?", (json.dumps(raw), as_field.id))
    app.run_worker(burst=True)
    worker_config = {"region": "eu", "smtp_password": "worker-only"}
    assert as_argument.result(timeout=5) == {"ctx": worker_config, "argument": attacker}
    assert app.handle(as_field.id).result(timeout=5) == {"ctx": worker_config, "argument": None}


def test_a_subprocess_worker_takes_its_config_from_backroom_config(
    url: str, tmp_path: Path
) -> None:
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"region": "us"}))
    producer = build_app(url, config={"region": "producer-side"})
    handle = producer.enqueue("show_config", {"config": {"region": "payload"}})
    producer.close()
    proc = backroom_cli("worker", "--app", APP, "--burst", url=url,
                        env={"BACKROOM_CONFIG": str(config)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = backroom_cli("result", "--app", APP, handle.id, url=url)
    assert json.loads(result.stdout) == {"ctx": {"region": "us"}, "argument": {"region": "payload"}}
