"""The views built from the broker's own numbers: per tag (tag_report), failure groups with the
latest traceback, the last-hour activity per job name and minute, and the recent throughput.
Time moves through `now=`; every number is exact, however many jobs there are."""

from __future__ import annotations

import backroom
from backroom.brokers.base import MAX_TAGS, Claim, Failure, JobQuery
from backroom.reporting import activity, failure_groups, tag_report, throughput
from tests.helpers import envelope_for

NOW = 1_800_000_000.0  # a minute boundary (30,000,000 minutes)


def finish(app: backroom.App, claims: list[Claim], at: float, run_s: float) -> None:
    app.broker.ack([(claim, None) for claim in claims], now=at + run_s)


def test_tag_report_counts_every_outcome_and_lists_declared_tags(app: backroom.App) -> None:
    for n in range(5):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, tags=["edge-7"])
    app.enqueue("send_email", {"to": "a@example.com"}, tags=["edge-7"])
    app.enqueue("always_fails", {"message": "boom"}, tags=["edge-7"])
    app.run_worker(burst=True, queues=["default", "mail"])
    report = tag_report(app)
    tags = {t["tag"]: t for t in report["tags"]}
    edge = tags["edge-7"]
    assert edge["counts"] == {"succeeded": 6, "dead": 1, "rejected": 0, "cancelled": 0}
    assert edge["jobs"] == ["always_fails", "process_logs", "send_email"]
    assert edge["by_job"] == {"always_fails": 1, "process_logs": 5, "send_email": 1}
    assert edge["failure_rate"] == 1 / 7
    assert edge["run_time"]["count"] == 7 and edge["run_time"]["p95"] is not None
    assert edge["wait_time"]["count"] == 7 and edge["running"] == 0  # 7 attempts claimed, all done
    assert tags["logs"]["counts"]["succeeded"] == 5 and tags["email"]["counts"]["succeeded"] == 1
    assert tags["storage"]["total"] == 0  # declared by the registry, nothing finished yet
    assert (report["tags_kept"], report["max_tags"], report["other_tags"]) == (3, MAX_TAGS, None)


def test_tag_report_lists_the_busiest_tags_first_when_limited(app: backroom.App) -> None:
    app.enqueue("send_email", {"to": "a@example.com"}, tags=["vip"])
    app.enqueue_many(
        "process_logs", [{"server": f"e-{n}", "day": "d"} for n in range(30)], tags=["bulk"]
    )
    app.run_worker(burst=True, queues=["default", "mail"])
    assert [t["tag"] for t in tag_report(app, limit=2)["tags"]] == ["bulk", "logs"]
    assert [t["tag"] for t in tag_report(app, limit=4)["tags"]] == ["bulk", "email", "logs", "vip"]


def test_failure_groups_split_by_exception_type_and_keep_the_latest(app: backroom.App) -> None:
    for n in range(3):
        app.enqueue("upload", {"path": f"/s/{n}"})
    claims = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=3, now=NOW)
    for index, claim in enumerate(claims):
        kind = "ConnectionError" if index < 2 else "TimeoutError"
        failure = Failure(kind, f"try {index}", f"Traceback ...\n{kind}: try {index}\n")
        app.broker.nack(claim, failure, retry_at=None, now=NOW + index)
    data = failure_groups(app)
    groups = {(g["job"], g["type"]): g for g in data["groups"]}
    connection = groups[("upload", "ConnectionError")]
    assert (connection["failures"], connection["dead"], connection["retried"]) == (2, 2, 0)
    assert connection["latest"]["message"] == "try 1"
    assert connection["latest"]["id"] == claims[1].id and connection["latest"]["at"] == NOW + 1
    assert connection["latest"]["traceback"].endswith("ConnectionError: try 1\n")
    assert groups[("upload", "TimeoutError")]["dead"] == 1
    assert data["dead_total"] == {"upload": 3}
    assert next(iter(groups)) == ("upload", "ConnectionError")  # biggest group first


def test_a_failure_groups_traceback_is_read_only_while_the_latest_record_matches(
    app: backroom.App,
) -> None:
    job_id = app.enqueue("upload", {"path": "/s/1"}).id
    [claim] = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=1, now=NOW)
    app.broker.nack(claim, Failure("TimeoutError", "slow", "tb 1"), retry_at=NOW + 5, now=NOW)
    app.broker.promote_due(now=NOW + 5)
    [again] = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=1, now=NOW + 5)
    app.broker.nack(again, Failure("OSError", "gone", "tb 2"), retry_at=None, now=NOW + 6)
    groups = {g["type"]: g for g in failure_groups(app)["groups"]}
    assert groups["OSError"]["latest"]["traceback"] == "tb 2"
    timeout = groups["TimeoutError"]["latest"]
    assert (timeout["id"], timeout["message"], timeout["traceback"]) == (job_id, "slow", "")
    app.broker.delete([job_id])
    assert failure_groups(app)["groups"][0]["latest"]["state"] is None  # the record is gone


def test_activity_counts_per_minute_with_p95(app: backroom.App) -> None:
    for n in range(7):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, now=NOW - 600)
    early = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=4, now=NOW - 300)
    finish(app, early, at=NOW - 300, run_s=0.5)  # four finish five minutes ago
    late = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=3, now=NOW + 10)
    finish(app, late[:2], at=NOW + 10, run_s=2.0)  # two in the current minute
    app.broker.nack(late[2], Failure("OSError", "x", ""), retry_at=NOW + 60, now=NOW + 15)
    data = activity(app, now=NOW + 30)
    [series] = [s for s in data["jobs"] if s["job"] == "process_logs"]
    assert data["bucket_s"] == 60 and len(series["succeeded"]) == 60
    assert data["start"] == NOW - 59 * 60  # the window ends with the minute holding now
    assert sum(series["succeeded"]) == 6
    assert series["succeeded"][-1] == 2 and series["failed"][-1] == 1  # a retried attempt
    assert series["succeeded"][-6] == 4  # NOW - 299.5 falls in the minute 5 before NOW's
    assert series["p95"][-6] == 0.5
    assert series["p95"][-1] == 5.0  # runs of 2, 2 and 5 s (the failed attempt ran too)
    assert series["p95"][-2] is None
    assert [s["job"] for s in data["jobs"]][:5] == list(app.registry.names())


def test_throughput_counts_jobs_finished_per_minute_over_the_last_five_minutes(
    app: backroom.App,
) -> None:
    for n in range(5):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, now=NOW - 600)
    logs = app.broker.claim(["default"], worker_id="w", lease_s=900, limit=5, now=NOW - 600)
    finish(app, logs[:1], at=NOW - 242, run_s=1)  # NOW - 241: the minute before the window
    finish(app, logs[1:2], at=NOW - 241, run_s=1)  # NOW - 240: the window's first second
    finish(app, logs[2:4], at=NOW + 20, run_s=1)  # the current minute
    app.broker.nack(logs[4], Failure("OSError", "x", ""), retry_at=NOW + 60, now=NOW + 5)
    app.enqueue("always_fails", {"message": "boom"}, now=NOW)
    app.enqueue("send_email", {"to": "a@example.com"}, now=NOW)
    app.broker.enqueue([envelope_for("no_such_job")], now=NOW)
    claims = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=2, now=NOW)
    dead = next(c for c in claims if c.envelope.job == "always_fails")
    stray = next(c for c in claims if c.envelope.job == "no_such_job")
    app.broker.nack(dead, Failure("ValueError", "boom", ""), retry_at=None, now=NOW + 10)
    app.broker.reject(stray, "unknown job: 'no_such_job'", now=NOW + 11)
    app.broker.cancel(app.broker.jobs(JobQuery(job="send_email"))[0].id, now=NOW + 12)

    data = throughput(app, now=NOW + 30)  # a window of 4 whole minutes and 30 s
    assert data["all"] == {"since": NOW - 240, "window_s": 270.0, "finished": 5,
                           "per_minute": round(5 * 60 / 270, 3)}  # fmt: skip
    assert data["jobs"] == {
        "process_logs": {"finished": 3, "per_minute": round(3 * 60 / 270, 3)},  # not the retry
        "always_fails": {"finished": 1, "per_minute": round(60 / 270, 3)},  # dead is finished
        "no_such_job": {"finished": 1, "per_minute": round(60 / 270, 3)},  # so is rejected
    }  # send_email was cancelled: not a finish
    later = throughput(app, now=NOW + 60 * 10)
    assert later["all"]["finished"] == 0 and later["jobs"] == {}
