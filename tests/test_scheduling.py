"""Running work later: delayed jobs (delay=, at=) and cron schedules in time zones, one job per
tick however many schedulers race, the missed-tick policy, and `backroom scheduler`. App level on
every broker; time moves through `now=`, nobody sleeps."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import backroom
from backroom.brokers import JobQuery
from backroom.errors import BackroomError, ConfigError
from backroom.reporting import stats_summary
from backroom.scheduler import Schedule, Scheduler
from tests.apps.scheduled import (
    HAS_REDIS_BROKER,
    Harness,
    broker_url,
    cli,
    race,
    start_cli,
)
from tests.apps.scheduled import app as scheduled_app
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

REDIS = [pytest.param("redis", marks=pytest.mark.redis)] if HAS_REDIS_BROKER else []
BACKENDS = ["memory", "sqlite", *REDIS]
SHARED_BACKENDS = ["sqlite", *REDIS]  # brokers several processes can share

BERLIN = ZoneInfo("Europe/Berlin")
T = datetime(2033, 5, 18, 10, 0, tzinfo=UTC).timestamp()  # a minute boundary, far from now
APP = "tests.apps.scheduled:app"


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    built = Harness(broker_url(request.param, tmp_path, request))
    built.app.broker.purge()  # redis is shared by the session
    yield built
    built.release_all()
    built.app.broker.purge()
    built.app.close()


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, fold: int = 0) -> float:
    """Unix seconds of a wall-clock time in Berlin (fold=1: the second of a repeated time)."""
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold).timestamp()


def local(moment: float) -> str:
    return datetime.fromtimestamp(moment, BERLIN).isoformat()


def scheduler_jobs(app: backroom.App) -> list[dict[str, Any]]:
    return [app.describe(r) for r in app.broker.jobs(JobQuery(limit=1000))]


# -- delayed jobs --------------------------------------------------------------------------------


def test_a_delayed_job_waits_scheduled_and_is_queued_once_due(harness: Harness) -> None:
    app = harness.app
    before = time.time()
    later = app.enqueue("note", {"label": "later"}, delay=60)
    assert later.status() == "scheduled"
    eta = later.info()["eta"]
    assert before + 60 <= eta <= time.time() + 60
    assert app.run_worker(burst=True, concurrency=1) == 0  # nothing is due: nothing runs
    assert harness.ran == []
    assert app.broker.promote_due(now=eta - 1) == 0
    assert later.status() == "scheduled"
    assert app.broker.promote_due(now=eta) == 1
    assert later.status() == "queued"
    assert app.run_worker(burst=True, concurrency=1) == 0
    assert later.result(timeout=5) == "later" and harness.ran == ["later"]


def test_at_a_datetime_schedules_for_that_moment_and_a_past_moment_queues_at_once(
    harness: Harness,
) -> None:
    app = harness.app
    moment = datetime.now(UTC) + timedelta(hours=1)
    at = app.enqueue("note", {"label": "at"}, at=moment)
    at_berlin = app.enqueue("note", {"label": "berlin"}, at=moment.astimezone(BERLIN))
    past = app.enqueue("note", {"label": "past"}, at=moment - timedelta(hours=2))
    now = app.enqueue("note", {"label": "now"}, delay=0)
    assert [h.status() for h in (at, at_berlin, past, now)] == ["scheduled", "scheduled"] + [
        "queued"
    ] * 2
    assert at.info()["eta"] == at_berlin.info()["eta"] == pytest.approx(moment.timestamp())
    assert app.broker.promote_due(now=moment.timestamp() - 0.5) == 0
    assert app.broker.promote_due(now=moment.timestamp()) == 2
    assert at.status() == at_berlin.status() == "queued"


def test_delay_and_at_are_checked_at_enqueue(harness: Harness) -> None:
    app = harness.app
    with pytest.raises(BackroomError, match="either delay= or at="):
        app.enqueue("note", {"label": "x"}, delay=5, at=datetime.now(UTC))
    with pytest.raises(BackroomError, match="delay must be a number of seconds >= 0"):
        app.enqueue("note", {"label": "x"}, delay=-1)
    with pytest.raises(BackroomError, match="at must be a datetime"):
        app.enqueue("note", {"label": "x"}, at="tomorrow")
    assert app.broker.jobs(JobQuery()) == []


def test_a_running_worker_runs_a_delayed_job_once_due_and_never_before(harness: Harness) -> None:
    app = harness.app
    with harness.worker(concurrency=2):
        handle = app.enqueue("note", {"label": "soon"}, delay=0.3)
        wait_until(lambda: handle.status() == "succeeded", 20, "the delayed job to run")
    info = handle.info()
    assert info["started_at"] >= info["eta"]
    assert harness.ran == ["soon"]


# -- cron in time zones --------------------------------------------------------------------------


def test_next_runs_keep_the_wall_clock_time_across_daylight_saving() -> None:
    daily = Schedule("daily", "note", "0 6 * * *", timezone="Europe/Berlin")
    spring = [daily.next_after(berlin(2026, 3, 27, 12))]
    spring.append(daily.next_after(spring[-1]))
    assert [local(t) for t in spring] == ["2026-03-28T06:00:00+01:00", "2026-03-29T06:00:00+02:00"]
    assert spring[1] - spring[0] == 23 * 3600  # the night the clocks go forward is one hour short
    autumn = daily.next_after(berlin(2026, 10, 24, 12))
    assert local(autumn) == "2026-10-25T06:00:00+01:00"
    assert autumn - berlin(2026, 10, 24, 6) == 25 * 3600
    utc = Schedule("utc", "note", "0 6 * * *")
    assert (
        utc.next_after(berlin(2026, 10, 24, 12))
        == datetime(2026, 10, 25, 6, tzinfo=UTC).timestamp()
    )


def test_a_time_the_clocks_skip_fires_at_the_jump_and_a_repeated_time_fires_once() -> None:
    nightly = Schedule("nightly", "note", "30 2 * * *", timezone="Europe/Berlin")

    def runs(schedule: Schedule, start: float, n: int) -> list[str]:
        moments = [schedule.next_after(start)]
        while len(moments) < n:
            moments.append(schedule.next_after(moments[-1]))
        return [local(t) for t in moments]

    # 02:30 does not exist on 2026-03-29: it runs when the clocks jump from 02:00 to 03:00
    assert runs(nightly, berlin(2026, 3, 28, 12), 2) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    # 02:30 happens twice on 2026-10-25: a nightly job runs once, at the first
    assert runs(nightly, berlin(2026, 10, 24, 12), 2) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    second_half_past_two = berlin(2026, 10, 25, 2, 45, fold=1)
    assert nightly.latest_at_or_before(second_half_past_two) == berlin(2026, 10, 25, 2, 30)
    # an hourly job keeps running every real hour through the repeated one
    hourly = Schedule("hourly", "note", "0 * * * *", timezone="Europe/Berlin")
    assert runs(hourly, berlin(2026, 10, 25, 1, 30), 3) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


def test_a_nightly_schedule_fires_once_on_the_night_the_clocks_go_back(harness: Harness) -> None:
    app = harness.app
    app.schedule("note", cron="30 2 * * *", payload={"label": "nightly"},
                 timezone="Europe/Berlin", name="nightly")  # fmt: skip
    scheduler = Scheduler(app, started_at=berlin(2026, 10, 24, 12))
    # every five minutes of the three real hours from 01:00 (summer time) to 03:00 (winter)
    moments = [berlin(2026, 10, 25, 1, 0) + 300 * step for step in range(37)]
    assert berlin(2026, 10, 25, 2, 30, fold=1) in moments  # the second 02:30 comes by, too
    assert sum(scheduler.tick(now=moment) for moment in moments) == 1
    assert app.broker.last_fired("nightly") == berlin(2026, 10, 25, 2, 30)


def test_the_monthly_invoice_run_fires_at_six_in_berlin_summer_and_winter() -> None:
    invoices = Schedule("invoices", "send_invoices", "0 6 1 * *", timezone="Europe/Berlin")
    summer = invoices.next_after(berlin(2026, 3, 15))
    winter = invoices.next_after(berlin(2026, 10, 15))
    assert datetime.fromtimestamp(summer, UTC) == datetime(2026, 4, 1, 4, tzinfo=UTC)
    assert datetime.fromtimestamp(winter, UTC) == datetime(2026, 11, 1, 5, tzinfo=UTC)
    assert invoices.describe(None, berlin(2026, 3, 15))["next_run_local"] == (
        "2026-04-01T06:00:00+02:00"
    )


def test_schedules_are_listed_with_their_next_and_last_run(harness: Harness) -> None:
    app = harness.app
    app.schedule("send_invoices", cron="0 6 1 * *", payload={"month": "previous"},
                 timezone="Europe/Berlin", tags=["billing"])  # fmt: skip
    [listed] = stats_summary(app)["schedules"]
    expected_next = app.schedules["send_invoices"].next_after(time.time())
    assert listed == {
        "name": "send_invoices", "job": "send_invoices", "cron": "0 6 1 * *",
        "timezone": "Europe/Berlin", "payload": {"month": "previous"}, "tags": ["billing"],
        "last_run": None, "next_run": expected_next, "next_run_local": local(expected_next),
    }  # fmt: skip
    first = berlin(2033, 6, 1, 6)
    assert Scheduler(app, started_at=first - 60).tick(now=first + 5) == 1
    [listed] = stats_summary(app)["schedules"]
    assert listed["last_run"] == first


# -- the scheduler's source ----------------------------------------------------------------------


def test_a_scheduler_only_job_can_only_be_started_by_a_schedule(harness: Harness) -> None:
    app = harness.app
    with pytest.raises(backroom.SourceNotAllowed, match="allowed sources: scheduler"):
        app.enqueue("send_invoices", {"month": "2033-05"})

    @app.job(sources={"api"})
    def only_api(ctx: backroom.Context) -> None: ...

    with pytest.raises(backroom.SourceNotAllowed, match="source 'scheduler' may not schedule"):
        app.schedule("only_api", cron="0 6 1 * *")
    app.schedule("send_invoices", cron="0 6 1 * *", payload={"month": "previous"},
                 timezone="Europe/Berlin")  # fmt: skip
    first = berlin(2033, 6, 1, 6)
    assert Scheduler(app, started_at=first - 60).tick(now=first) == 1
    [job] = [j for j in scheduler_jobs(app) if j["job"] == "send_invoices"]
    assert (job["source"], job["state"]) == ("scheduler", "queued")
    assert app.run_worker(burst=True) == 0
    assert app.handle(job["id"]).result(timeout=5) == {"month": "previous", "sent": 3}
    assert "invoices:previous:scheduler" in harness.ran


def test_scheduled_jobs_are_signed_as_the_scheduler_when_sources_sign(tmp_path: Path) -> None:
    keys = {"scheduler": ["scheduler-key-2033"], "api": ["api-key-2033"]}
    signed = Harness(f"sqlite:///{tmp_path / 'signed.db'}", keys=keys)
    app = signed.app
    app.schedule("send_invoices", cron="* * * * *", payload={"month": "previous"})
    assert Scheduler(app, started_at=T - 1).tick(now=T) == 1
    assert app.run_worker(burst=True) == 0
    assert signed.ran == ["invoices:previous:scheduler"]
    app.close()


# -- one job per tick ----------------------------------------------------------------------------


def test_schedulers_racing_in_threads_create_exactly_one_job_per_tick(harness: Harness) -> None:
    harness.app.schedule("note", cron="* * * * *", payload={"label": "tick"}, name="minutely")
    url = harness.app.url
    # each racer has its own connection, except on memory://: one in-memory database, shared
    racers = [harness.app] if url == "memory://" else [Harness(url).app for _ in range(3)]
    for racer in racers:
        racer.schedules = harness.app.schedules
    schedulers = [Scheduler(racers[n % len(racers)], started_at=T - 1) for n in range(3)]
    moments = [T + 60 * minute + offset for minute in range(8) for offset in (0.0, 0.1, 30.0)]
    barrier = threading.Barrier(3, timeout=30)
    created = Counter[int]()

    def run(index: int) -> None:
        for moment in moments:
            barrier.wait()  # all three tick the same moment at once
            created[index] += schedulers[index].tick(now=moment)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    jobs = scheduler_jobs(harness.app)
    keys = Counter(job["unique_key"] for job in jobs)
    assert keys == Counter({f"schedule:minutely:{T + 60 * m:.0f}": 1 for m in range(8)})
    assert {job["source"] for job in jobs} == {"scheduler"}
    assert sum(created.values()) == 8
    assert harness.app.broker.last_fired("minutely") == T + 7 * 60
    for racer in racers:
        if racer is not harness.app:
            racer.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", SHARED_BACKENDS)
def test_three_scheduler_processes_on_one_broker_create_exactly_one_job_per_tick(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = broker_url(kind, tmp_path, request)
    harness = Harness(url)
    app = harness.app
    app.broker.purge()
    ticks = 6
    outcomes = race("fire", url, str(T), str(ticks), processes=3)
    jobs = scheduler_jobs(app)
    keys = Counter(job["unique_key"] for job in jobs)
    assert keys == Counter({f"schedule:every_minute:{T + 60 * m:.0f}": 1 for m in range(ticks)})
    assert {(job["job"], job["source"]) for job in jobs} == {("report", "scheduler")}
    assert sum(outcome["created"] for outcome in outcomes) == ticks
    assert app.broker.last_fired("every_minute") == T + 60 * (ticks - 1)
    app.broker.purge()
    app.close()


# -- missed ticks --------------------------------------------------------------------------------


def test_after_downtime_a_schedule_fires_once_for_its_latest_missed_tick(harness: Harness) -> None:
    app = harness.app
    app.schedule("note", cron="*/5 * * * *", payload={"label": "five"}, name="five")
    scheduler = Scheduler(app, started_at=T)
    assert scheduler.tick(now=T + 1) == 0  # the tick at T came before the scheduler started
    assert scheduler.tick(now=T + 300) == 1
    assert scheduler.tick(now=T + 301) == 0
    # down for an hour: eleven ticks missed, one job, for the latest of them
    assert scheduler.tick(now=T + 3600 + 299) == 1
    assert scheduler.tick(now=T + 3600 + 299.5) == 0
    assert app.broker.last_fired("five") == T + 3600
    # a fresh scheduler (a restart) catches up the same way, from what the broker remembers
    restarted = Scheduler(app, started_at=T + 7000)
    assert restarted.tick(now=T + 7000) == 1
    keys = sorted(job["unique_key"] for job in scheduler_jobs(app))
    assert keys == sorted(f"schedule:five:{T + s:.0f}" for s in (300, 3600, 6900))


def test_one_schedule_that_cannot_fire_does_not_hold_up_the_others(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    app = harness.app
    app.schedule("note", cron="* * * * *", payload={"label": "fine"}, name="fine")
    app.schedules["ghost"] = Schedule("ghost", "no_such_job", "* * * * *")  # an old deploy's
    assert Scheduler(app, started_at=T - 1).tick(now=T) == 1
    assert "schedule ghost could not fire" in caplog.text
    assert app.broker.last_fired("fine") == T and app.broker.last_fired("ghost") is None


def test_a_worker_with_the_scheduler_fires_a_due_tick_and_runs_its_job(harness: Harness) -> None:
    app = harness.app
    app.schedule("send_invoices", cron="* * * * *", payload={"month": "previous"},
                 name="invoices")  # fmt: skip
    app.broker.fire_once("invoices", (time.time() // 60 - 60) * 60)  # last ran an hour ago
    with harness.worker(scheduler=True):
        wait_until(lambda: "invoices:previous:scheduler" in harness.ran, 20,
                   "the worker's scheduler to fire the missed tick and run its job")  # fmt: skip
    last = app.broker.last_fired("invoices")
    assert last is not None and last >= (time.time() // 60 - 1) * 60


# -- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "timezone", "message"),
    [
        ("61 * * * *", "UTC", "cron '61 * * * *' is not valid: the minute field '61' is out of"),
        ("0 25 * * *", "UTC", "the hour field '25' is out of range"),
        ("0 6 1 13 *", "UTC", "the month field '13'"),
        ("every monday", "UTC", "has 2 field(s); use five: minute hour day-of-month month"),
        ("0 6 1 * * 30", "UTC", "has 6 field(s)"),
        ("@reboot", "UTC", "unknown cron alias '@reboot'; use one of @yearly"),
        ("0 0 30 2 *", "UTC", "cron '0 0 30 2 *' never fires"),
        ("0 6 * * *", "Europe/Berln", "unknown time zone 'Europe/Berln'; did you mean"),
        ("0 6 * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("0 6 * * *", "", "unknown time zone ''"),
    ],
)
def test_a_bad_cron_or_time_zone_is_a_clear_config_error(
    cron: str, timezone: str, message: str
) -> None:
    app = Harness("memory://").app
    with pytest.raises(ConfigError) as refused:
        app.schedule("note", cron=cron, payload={"label": "x"}, timezone=timezone, name="nightly")
    assert str(refused.value).startswith("schedule 'nightly': ")
    assert message in str(refused.value)
    assert app.schedules == {}


def test_aliases_and_a_second_schedule_of_one_job_need_their_own_name() -> None:
    app = Harness("memory://").app
    daily = app.schedule("note", cron="@daily", payload={"label": "daily"})
    assert daily.next_after(T) == T + 14 * 3600  # T is 10:00 UTC
    with pytest.raises(ConfigError, match="schedule 'note' is declared twice; pass name="):
        app.schedule("note", cron="@hourly", payload={"label": "hourly"})
    hourly = app.schedule("note", cron="@hourly", payload={"label": "hourly"}, name="hourly")
    assert hourly.next_after(T) == T + 3600


# -- `backroom scheduler` ------------------------------------------------------------------------


@pytest.mark.timeout(180)  # three Python processes start: slow on a loaded 2-core machine
def test_three_scheduler_processes_fire_a_missed_tick_once_and_stop_on_sigterm(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    app = Harness(url).app
    app.broker.fire_once("every_minute", (time.time() // 60 - 30) * 60)  # last ran 30 min ago
    logs = [tmp_path / f"scheduler-{n}.log" for n in range(3)]
    procs = [start_cli("scheduler", "--app", APP, "-v", url=url, stderr=log) for log in logs]
    try:

        def all_ticked() -> bool:
            texts = [log.read_text() for log in logs]
            assert not any("Traceback" in text for text in texts), "\n".join(texts)
            return all("first tick done" in text for text in texts)

        wait_until(all_ticked, 120, "each scheduler process to tick the missed minute")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=15) for proc in procs] == [0, 0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    jobs = [job for job in scheduler_jobs(app) if job["job"] == "report"]
    keys = [job["unique_key"] for job in jobs]
    assert jobs and len(set(keys)) == len(keys)  # one job per tick (a minute may turn meanwhile)
    assert {job["source"] for job in jobs} == {"scheduler"}
    created = sum(log.read_text().count("schedule every_minute fired for") for log in logs)
    assert created == len(jobs)
    app.schedules = scheduled_app.schedules  # what `backroom stats` would list
    listed = {entry["name"]: entry for entry in stats_summary(app)["schedules"]}
    assert set(listed) == {"send_invoices", "every_minute"}
    last_run = max(float(key.rsplit(":", 1)[1]) for key in keys)
    assert listed["every_minute"]["last_run"] == last_run
    assert listed["every_minute"]["next_run"] > last_run
    app.close()


def test_backroom_scheduler_refuses_an_app_without_schedules(tmp_path: Path) -> None:
    proc = cli("scheduler", "--app", "tests.apps.ledger:app",
               url=f"sqlite:///{tmp_path / 'jobs.db'}", ok=False)  # fmt: skip
    assert proc.stderr.startswith("backroom: ") and "declares no schedules" in proc.stderr
