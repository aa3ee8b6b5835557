"""GET /metrics: Prometheus exposition read from the broker's counters at scrape time, labelled by
job name, queue and state, never by job id."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

import backroom
from tests.web.conftest import TestClient


def scrape(client: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    [found] = [v for got, v in samples[name] if all(got.get(k) == x for k, x in labels.items())]
    return found


def test_metrics_count_jobs_by_name_queue_and_state(app: backroom.App, client: TestClient) -> None:
    for n in range(3):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "2026-11-21"})
    app.enqueue("always_fails", {"message": "boom"})
    app.enqueue("send_email", {"to": "a@example.com"})
    app.run_worker(burst=True, queues=["default"])
    app.broker.pause("mail")
    samples = scrape(client)
    assert (
        value(samples, "backroom_jobs", job="process_logs", queue="default", state="succeeded") == 3
    )
    assert value(samples, "backroom_jobs", job="always_fails", state="dead") == 1
    assert value(samples, "backroom_jobs", job="send_email", queue="mail", state="queued") == 1
    assert value(samples, "backroom_queue_depth", queue="mail") == 1
    assert value(samples, "backroom_queue_paused", queue="mail") == 1
    assert value(samples, "backroom_queue_paused", queue="default") == 0
    assert value(samples, "backroom_job_run_seconds_count", job="process_logs") == 3
    assert value(samples, "backroom_job_run_seconds_bucket", job="process_logs", le="+Inf") == 3
    assert value(samples, "backroom_job_run_seconds_sum", job="process_logs") > 0
    assert (
        value(samples, "backroom_schedule_next_run_timestamp_seconds", schedule="send_invoices")
        > time.time()
    )
    assert value(samples, "backroom_workers") == 0
    allowed = {"job", "queue", "state", "le", "reason", "schedule"}
    for name, entries in samples.items():
        for labels, _ in entries:
            assert set(labels) <= allowed, (name, labels)  # never a job id


def test_histogram_buckets_are_cumulative(app: backroom.App, client: TestClient) -> None:
    for n in range(5):
        app.enqueue("process_logs", {"server": f"edge-{n}", "day": "2026-11-21"})
    app.run_worker(burst=True)
    buckets = [
        (float(labels["le"]), count)
        for labels, count in scrape(client)["backroom_job_run_seconds_bucket"]
        if labels["job"] == "process_logs"
    ]
    counts = [count for _, count in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] == 5
    assert len(buckets) <= 30  # bounded series per job name


def test_rejections_and_retries_are_counted(app: backroom.App, client: TestClient) -> None:
    from backroom.envelope import Envelope, new_id

    app.broker.enqueue(
        [Envelope(id=new_id(), job="nobody_registered_this", source="api", created_at=time.time())]
    )
    app.run_worker(burst=True)
    samples = scrape(client)
    [(labels, count)] = [
        (labels, v)
        for labels, v in samples["backroom_job_rejections_total"]
        if labels["job"] == "nobody_registered_this"
    ]
    assert count == 1 and labels["reason"]
    assert value(samples, "backroom_jobs", job="nobody_registered_this", state="rejected") == 1


def test_jobs_are_labelled_with_the_queue_they_were_enqueued_on(
    app: backroom.App, client: TestClient
) -> None:
    app.enqueue("process_logs", {"server": "edge-1", "day": "2026-11-21"}, queue="bulk")
    app.enqueue("process_logs", {"server": "edge-2", "day": "2026-11-21"})
    app.run_worker(burst=True, queues=["default"])
    samples = scrape(client)
    assert value(samples, "backroom_jobs", job="process_logs", queue="bulk", state="queued") == 1
    assert value(samples, "backroom_jobs", job="process_logs", queue="default", state="queued") == 0
    assert (
        value(samples, "backroom_jobs", job="process_logs", queue="default", state="succeeded") == 1
    )
    assert value(samples, "backroom_jobs", job="upload", queue="default", state="queued") == 0
    assert value(samples, "backroom_queue_depth", queue="bulk") == 1
