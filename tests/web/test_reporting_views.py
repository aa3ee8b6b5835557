"""The views the broker has no counters for (per tag, failure groups, last-hour activity) read a
bounded number of recent jobs and say so: `complete`, `sampled`, `covered_since`."""

from __future__ import annotations

import time

import backroom
from backroom.brokers.base import Claim, Failure
from backroom.reporting import activity, failure_groups, quantile, tag_summaries


def finish(app: backroom.App, claims: list[Claim], at: float, run_s: float) -> None:
    app.broker.ack([(claim, None) for claim in claims], now=at + run_s)


def test_quantile_is_nearest_rank() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(n) for n in range(1, 101)], 0.95) == 95.0
    assert quantile([7.0], 0.99) == 7.0


def test_tag_summaries_are_exact_below_the_budget_and_say_when_they_are_not(
    app: backroom.App,
) -> None:
    for n in range(5):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, tags=["edge-7"])
    app.enqueue("send_email", {"to": "a@example.com"}, tags=["edge-7"])
    exact = {t["tag"]: t for t in tag_summaries(app)}
    assert exact["edge-7"]["complete"] is True and exact["edge-7"]["sampled"] == 6
    assert exact["edge-7"]["counts"]["queued"] == 6
    assert exact["edge-7"]["jobs"] == ["process_logs", "send_email"]
    assert exact["logs"]["sampled"] == 5 and exact["email"]["sampled"] == 1
    assert exact["storage"]["sampled"] == 0  # declared by the registry, not seen yet
    # a budget smaller than the jobs: 20 per job name at least, so 5 + 1 still fit ...
    assert {t["tag"]: t for t in tag_summaries(app, budget=1)}["edge-7"]["complete"] is True
    for n in range(30):
        app.enqueue("process_logs", {"server": f"more-{n}", "day": "d"}, tags=["edge-7"])
    partial = {t["tag"]: t for t in tag_summaries(app, budget=1)}["edge-7"]
    assert partial["complete"] is False and partial["sampled"] == 20 + 1  # ... now it is cut


def test_a_busy_job_does_not_hide_the_tags_of_a_quiet_one(app: backroom.App) -> None:
    app.enqueue("send_email", {"to": "a@example.com"}, tags=["vip"])
    app.enqueue_many("process_logs", [{"server": f"e-{n}", "day": "d"} for n in range(300)])
    tags = {t["tag"]: t for t in tag_summaries(app, budget=100)}
    assert tags["vip"]["sampled"] == 1 and tags["vip"]["complete"] is True
    assert tags["logs"]["complete"] is False


def test_failure_groups_split_by_exception_type_and_keep_the_latest(app: backroom.App) -> None:
    for n in range(3):
        app.enqueue("upload", {"path": f"/s/{n}"})
    claims = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=3)
    now = time.time()
    for index, claim in enumerate(claims):
        kind = "ConnectionError" if index < 2 else "TimeoutError"
        app.broker.nack(
            claim, Failure(kind, f"try {index}", "Traceback ..."), retry_at=None, now=now + index
        )
    data = failure_groups(app)
    groups = {(g["job"], g["type"]): g for g in data["groups"]}
    assert groups[("upload", "ConnectionError")]["dead"] == 2
    assert groups[("upload", "ConnectionError")]["latest"]["message"] == "try 1"
    assert groups[("upload", "TimeoutError")]["dead"] == 1
    assert data["dead_total"] == {"upload": 3}
    assert next(iter(groups)) == ("upload", "ConnectionError")  # biggest group first


def test_activity_buckets_by_finish_minute_with_p95(app: backroom.App) -> None:
    now = 1_800_000_000.0
    for n in range(6):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, now=now - 600)
    early = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=4, now=now - 300)
    finish(app, early, at=now - 300, run_s=0.5)  # four finish five minutes ago
    late = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=2, now=now - 32)
    finish(app, late, at=now - 32, run_s=2.0)  # two in the last minute
    data = activity(app, now=now)
    [series] = [s for s in data["jobs"] if s["job"] == "process_logs"]
    assert data["bucket_s"] == 60 and len(series["succeeded"]) == 60
    assert sum(series["succeeded"]) == 6
    assert series["succeeded"][-1] == 2
    assert series["succeeded"][-5] == 4  # (3600 - 299.5) // 60 = bucket 55 of 60
    assert series["p95"][-1] == 2.0 and series["p95"][-5] == 0.5
    assert series["covered_since"] == data["start"]


def test_activity_stops_at_its_cap_and_says_how_far_back_it_saw(app: backroom.App) -> None:
    now = 1_800_000_000.0
    for n in range(12):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "d"}, now=now - 1200 + n * 60)
    capped = activity(app, now=now, per_job=5)
    [series] = [s for s in capped["jobs"] if s["job"] == "process_logs"]
    assert series["sampled"] == 5
    assert series["covered_since"] > capped["start"]  # older minutes were not read
    full = activity(app, now=now, per_job=100)
    [series] = [s for s in full["jobs"] if s["job"] == "process_logs"]
    assert series["sampled"] == 12 and series["covered_since"] == full["start"]
