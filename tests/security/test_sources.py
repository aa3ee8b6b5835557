"""Authenticated sources in a real worker. With keys configured, an envelope claiming a source
must carry a signature made with one of that source's keys: a forged `scheduler` job (signed
with the `api` key, or unsigned) is rejected with the reason, never runs, and on_reject fires.
Keys rotate with an overlap. Without keys, sources are trusted as declared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

import backroom
from backroom.brokers.base import JobQuery
from backroom.envelope import Envelope, new_id
from backroom.errors import ConfigError
from tests.security.conftest import APP, backroom_cli
from tests.security.secure_app import build_app

API, SCHEDULER, JOBS = "api-key-7f3a", "scheduler-key-91c2", "jobs-key-44d0"
WORKER_KEYS = {"api": [API], "scheduler": [SCHEDULER], "job:*": [JOBS]}


def invoice_run(**fields: Any) -> Envelope:
    """Valid JSON for the scheduler-only job, as a program holding some key could write it."""
    base: dict[str, Any] = {
        "id": new_id(), "job": "send_invoices", "source": "scheduler",
        "payload": {"month": "2026-10"}, "created_at": 1_790_000_000.0,
    }  # fmt: skip
    base.update(fields)
    return Envelope(**base)


def rejected_by(app: backroom.App) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    app.on_reject(lambda envelope, error: seen.append((envelope.id, envelope.source, str(error))))
    return seen


def test_a_forged_scheduler_job_is_rejected_in_the_worker_and_never_runs(url: str) -> None:
    worker = build_app(url, keys=WORKER_KEYS)
    hooks = rejected_by(worker)
    api_signed = invoice_run().signed(API.encode())  # the web team's key, claiming "scheduler"
    unsigned = invoice_run()
    relabelled = msgspec.structs.replace(  # a genuine api envelope, its source rewritten
        invoice_run(source="api").signed(API.encode()), source="scheduler"
    )
    garbage_signature = invoice_run(signature="f" * 64)
    genuine = invoice_run().signed(SCHEDULER.encode())
    forged = [api_signed, unsigned, relabelled, garbage_signature]
    worker.broker.enqueue([*forged, genuine])

    assert worker.run_worker(burst=True) == 0

    reasons = {e.id: worker.handle(e.id).info()["reason"] for e in forged}
    assert [worker.handle(e.id).status() for e in forged] == ["rejected"] * 4
    assert reasons[unsigned.id] == "bad signature: envelope from 'scheduler' is not signed"
    for envelope in (api_signed, relabelled, garbage_signature):
        assert reasons[envelope.id] == (
            "bad signature: signature does not match a key of source 'scheduler'"
        )
    assert worker.runs == [("send_invoices", {"month": "2026-10"})]  # type: ignore[attr-defined]
    assert worker.handle(genuine.id).result(timeout=5) == {"sent": 3}
    assert sorted(h[0] for h in hooks) == sorted(e.id for e in forged)
    assert {(source, error) for _, source, error in hooks} == {
        ("scheduler", "envelope from 'scheduler' is not signed"),
        ("scheduler", "signature does not match a key of source 'scheduler'"),
    }
    rejections = worker.broker.stats().jobs["send_invoices"].rejections
    assert rejections == {"bad signature": 4}


def test_a_producer_cannot_claim_a_source_whose_key_it_does_not_hold(url: str) -> None:
    web = build_app(url, keys={"api": [API]})
    try:
        web.enqueue("send_invoices", {"month": "2026-10"}, source="scheduler")
    except ConfigError as exc:
        assert "no signing key for source 'scheduler'" in str(exc)
    else:
        raise AssertionError("enqueue as scheduler without its key went through")
    # ... and what the api key can sign, the worker turns down by source policy as usual
    envelope = web.envelope("add", {"a": 1})
    worker = build_app(url, keys=WORKER_KEYS)
    scheduled_as_api = msgspec.structs.replace(invoice_run(source="api"), id=new_id())
    worker.broker.enqueue([envelope, scheduled_as_api.signed(API.encode())])
    worker.run_worker(burst=True)
    assert worker.handle(envelope.id).result(timeout=5) == 1
    assert worker.handle(scheduled_as_api.id).info()["reason"].startswith("source not allowed:")


def test_a_replayed_envelope_with_a_new_id_or_time_is_rejected(url: str) -> None:
    worker = build_app(url, keys=WORKER_KEYS)
    captured = invoice_run().signed(SCHEDULER.encode())
    replays = [
        msgspec.structs.replace(captured, id=new_id()),
        msgspec.structs.replace(captured, id=new_id(), created_at=captured.created_at + 86400),
        msgspec.structs.replace(captured, id=new_id(), payload={"month": "2026-11"}),
    ]
    worker.broker.enqueue(replays)
    worker.run_worker(burst=True)
    assert [worker.handle(e.id).status() for e in replays] == ["rejected"] * 3
    assert worker.runs == []  # type: ignore[attr-defined]


def test_key_rotation_accepts_old_and_new_keys_during_the_overlap(url: str) -> None:
    old_producer = build_app(url, keys={"api": ["api-2025"]})
    new_producer = build_app(url, keys={"api": ["api-2026", "api-2025"]})  # newest first
    during = build_app(url, keys={"api": ["api-2026", "api-2025"]})
    old_job = old_producer.enqueue("add", {"a": 1})
    new_job = new_producer.enqueue("add", {"a": 2})
    assert old_producer.envelope("add", {"a": 1}).signature_valid([b"api-2025"])
    assert new_producer.envelope("add", {"a": 2}).signature_valid([b"api-2026"])
    assert not new_producer.envelope("add", {"a": 2}).signature_valid([b"api-2025"])

    during.run_worker(burst=True)
    assert (old_job.result(timeout=5), new_job.result(timeout=5)) == (1, 2)

    after = build_app(url, keys={"api": ["api-2026"]})  # the overlap is over
    late_old, late_new = (
        old_producer.enqueue("add", {"a": 3}),
        new_producer.enqueue("add", {"a": 4}),
    )
    after.run_worker(burst=True)
    assert late_old.status() == "rejected" and late_new.result(timeout=5) == 4
    assert (
        late_old.info()["reason"] == "bad signature: signature does not match a key of source 'api'"
    )


def test_jobs_enqueued_by_jobs_are_signed_with_the_job_prefix_key(url: str) -> None:
    worker = build_app(url, keys=WORKER_KEYS)
    producer = build_app(url, keys={"api": [API]})
    parent = producer.enqueue("fan_out", {"n": 3}, then="count")
    worker.run_worker(burst=True)
    children = parent.result(timeout=5)
    assert [worker.handle(c).result(timeout=5) for c in children] == [0, 1, 2]
    assert {worker.handle(c).info()["source"] for c in children} == {"job:fan_out"}
    [follow_up] = worker.broker.jobs(JobQuery(job="count"))
    assert (follow_up.state, follow_up.result, follow_up.envelope.source) == (
        "succeeded",
        3,
        "job:fan_out",
    )


def test_scheduler_envelopes_from_a_process_holding_the_scheduler_key_verify() -> None:
    worker = build_app("memory://", keys=WORKER_KEYS)
    envelope = worker.envelope("send_invoices", {"month": "2026-10"}, source="scheduler")
    worker.verify(envelope)


def test_without_keys_sources_are_trusted_as_declared(url: str) -> None:
    worker = build_app(url)
    assert not worker.keys
    unsigned_claim = invoice_run()  # anyone who can write to the broker can say "scheduler"
    worker.broker.enqueue([unsigned_claim])
    worker.run_worker(burst=True)
    assert worker.handle(unsigned_claim.id).result(timeout=5) == {"sent": 3}


def test_a_subprocess_worker_reads_its_keys_from_the_environment(url: str, runs_file: Path) -> None:
    producer = build_app(url, keys={"api": [API]})
    good = producer.enqueue("add", {"a": 20, "b": 22})
    forged = invoice_run().signed(API.encode())
    unsigned = invoice_run()
    producer.broker.enqueue([forged, unsigned])
    producer.close()
    env = {"BACKROOM_KEYS": f"api={API};scheduler={SCHEDULER};job:*={JOBS}",
           "SECURITY_RUNS": str(runs_file)}  # fmt: skip
    worker = backroom_cli("worker", "--app", APP, "--burst", url=url, env=env)
    assert worker.returncode == 0, worker.stderr
    assert API not in worker.stderr and SCHEDULER not in worker.stderr
    status = backroom_cli("status", "--app", APP, forged.id, "--json", url=url, env=env)
    assert json.loads(status.stdout)["state"] == "rejected", status.stderr
    assert json.loads(status.stdout)["reason"].startswith("bad signature: ")
    assert runs_file.read_text().split() == ["add", good.id]
    assert backroom_cli("result", "--app", APP, good.id, url=url, env=env).stdout.strip() == "42"


def test_a_subprocess_worker_refuses_to_start_on_malformed_keys(url: str) -> None:
    proc = backroom_cli("worker", "--app", APP, "--burst", url=url,
                        env={"BACKROOM_KEYS": "api=k1;scheduler"})  # fmt: skip
    assert proc.returncode != 0
    assert "BACKROOM_KEYS: entry #2 has no '='" in proc.stderr
    assert "Traceback" not in proc.stderr
