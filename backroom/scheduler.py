"""Cron schedules: parsing, next fire times in a time zone, and turning each due tick into exactly
one job however many schedulers run. Delayed jobs need no scheduler: every worker promotes them."""

from __future__ import annotations

import difflib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadDateError, CroniterError, croniter

from backroom.errors import ConfigError

if TYPE_CHECKING:
    from backroom.app import App

logger = logging.getLogger("backroom.scheduler")

# How long a tick's unique key keeps a late scheduler from creating a second job for that tick,
# even after the first one finished (a scheduler that read `last_fired` just before another
# fired the tick).
TICK_KEY_HOLD_S = 7 * 86400.0
CRON_FIELDS = "minute hour day-of-month month day-of-week"
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


@dataclass(frozen=True)
class Schedule:
    """A job run on a cron expression (five fields, or an alias such as "@daily") in an IANA
    time zone, with a fixed payload. Raises ConfigError for a bad expression or time zone.

    Daylight saving time, as cron does it: a wall-clock time that does not exist (the hour the
    clocks skip in spring) fires when the clocks jump, once; a wall-clock time that happens twice
    (the hour repeated in autumn) fires once, on its first occurrence, unless the hour field is
    "*": a schedule that runs every hour keeps running every real hour."""

    name: str
    job: str
    cron: str
    payload: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _zone(self.name, self.timezone)
        _check_cron(self.name, self.cron)
        try:
            self.next_after(time.time())
        except CroniterBadDateError:
            raise ConfigError(
                f"schedule {self.name!r}: cron {self.cron!r} never fires: "
                "no date matches all its fields"
            ) from None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def every_hour(self) -> bool:
        """True when the hour field is "*": the schedule follows real hours through DST."""
        hours: list[Any] = croniter(self.cron).expanded[1]
        return hours == ["*"]

    def _iter(self, after: float) -> croniter:
        return croniter(self.cron, datetime.fromtimestamp(after, self.zone))

    def _repeated(self, tick: float) -> bool:
        """The second occurrence of a wall-clock time (autumn's repeated hour)."""
        local = datetime.fromtimestamp(tick, self.zone)
        return bool(local.fold) and local.replace(fold=0).utcoffset() != local.utcoffset()

    def next_after(self, moment: float) -> float:
        """The first tick strictly after `moment` (Unix seconds)."""
        ticks = self._iter(moment)
        every_hour = self.every_hour
        while True:
            tick = float(ticks.get_next(float))
            if every_hour or not self._repeated(tick):
                return tick

    def latest_at_or_before(self, moment: float) -> float:
        """The last tick at or before `moment` (Unix seconds)."""
        ticks = self._iter(moment + 1e-3)  # get_prev is strict: step past a tick exactly at moment
        every_hour = self.every_hour
        while True:
            tick = float(ticks.get_prev(float))
            if every_hour or not self._repeated(tick):
                return tick

    def describe(self, last_fired: float | None, now: float) -> dict[str, Any]:
        """A JSON-ready view: what the CLI, the HTTP API and the dashboard list. `next_run` and
        `last_run` are Unix seconds; `next_run_local` is ISO 8601 in the schedule's time zone."""
        upcoming = self.next_after(now)
        return {
            "name": self.name,
            "job": self.job,
            "cron": self.cron,
            "timezone": self.timezone,
            "payload": self.payload,
            "tags": list(self.tags),
            "last_run": last_fired,
            "next_run": upcoming,
            "next_run_local": datetime.fromtimestamp(upcoming, self.zone).isoformat(),
        }


class Scheduler:
    """Fires the app's schedules: run any number of them (`backroom scheduler`, `backroom worker
    --scheduler`, on several hosts); each tick still creates exactly one job.

    Single fire: the job of a tick is enqueued with the unique key "schedule:NAME:TICK", held
    for a week, so schedulers racing on one tick all get the same job back; the broker's
    `fire_once` then records the tick as the schedule's last run. A scheduler that dies between
    the two steps leaves the job enqueued, and the next scheduler records the tick without
    creating another job.

    Missed ticks: after downtime (no scheduler running when ticks came due) a schedule fires
    once, for its latest missed tick, as soon as a scheduler runs again; the other missed ticks
    are skipped, never run in a burst. A schedule that has never fired starts with the first
    tick after its scheduler started (`started_at`): declaring a schedule never fires it for
    the past. Hosts should keep their clocks in sync (NTP): ticks are computed from local time."""

    def __init__(self, app: App, started_at: float | None = None) -> None:
        self.app = app
        self.started_at = time.time() if started_at is None else started_at

    def tick(self, now: float | None = None) -> int:
        """Fire every schedule whose next tick has come. Returns how many jobs this call
        created (0 when another scheduler got there first). A schedule that fails to fire is
        logged and skipped; the others still fire."""
        now = time.time() if now is None else now
        created = 0
        for schedule in list(self.app.schedules.values()):
            try:
                created += self._fire(schedule, now)
            except Exception:
                logger.exception("schedule %s could not fire; trying again next tick",
                                 schedule.name)  # fmt: skip
        return created

    def _fire(self, schedule: Schedule, now: float) -> int:
        broker = self.app.broker
        last = broker.last_fired(schedule.name)
        if schedule.next_after(self.started_at if last is None else last) > now:
            return 0
        tick = schedule.latest_at_or_before(now)  # missed ticks collapse into the latest
        envelope = self.app.envelope(
            schedule.job, schedule.payload, source="scheduler", tags=schedule.tags,
            unique_key=f"schedule:{schedule.name}:{tick:.0f}", unique_for=TICK_KEY_HOLD_S,
            now=now,
        )  # fmt: skip
        [job_id] = broker.enqueue([envelope], now=now)
        broker.fire_once(schedule.name, tick)
        when = datetime.fromtimestamp(tick, schedule.zone).isoformat()
        if job_id != envelope.id:
            logger.debug("schedule %s: the tick of %s already has job %s", schedule.name, when,
                         job_id)  # fmt: skip
            return 0
        logger.info("schedule %s fired for %s: job %s", schedule.name, when, job_id)
        return 1

    def run(self, stop: threading.Event | None = None, interval_s: float = 1.0) -> None:
        """Tick every `interval_s` seconds until `stop` is set (forever without one). A tick
        that fails (broker unreachable) is logged and tried again at the next interval."""
        if stop is None:
            stop = threading.Event()
        first = True
        while not stop.is_set():
            try:
                created = self.tick()
                if first:
                    logger.debug("first tick done: %d job(s) created; ticking every %g s",
                                 created, interval_s)  # fmt: skip
                    first = False
            except Exception:
                logger.exception("scheduler tick failed; retrying in %g s", interval_s)
            stop.wait(interval_s)


# -- checks --------------------------------------------------------------------------------------


def _zone(schedule: str, name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        near = difflib.get_close_matches(str(name), sorted(available_timezones()), n=1)
        hint = f"did you mean {near[0]!r}?" if near else "use an IANA name such as 'Europe/Berlin'"
        raise ConfigError(f"schedule {schedule!r}: unknown time zone {name!r}; {hint}") from None


def _check_cron(schedule: str, cron: str) -> None:
    if not isinstance(cron, str):
        raise ConfigError(f"schedule {schedule!r}: cron must be a string, got {cron!r}")
    fields = cron.split()
    if cron.strip().startswith("@"):
        if cron.strip() not in CRON_ALIASES:
            raise ConfigError(
                f"schedule {schedule!r}: unknown cron alias {cron!r}; use one of "
                + ", ".join(CRON_ALIASES)
            )
    elif len(fields) != 5:
        raise ConfigError(
            f"schedule {schedule!r}: cron {cron!r} has {len(fields)} field(s); use five: "
            f"{CRON_FIELDS}"
        )
    try:
        croniter(cron)
    except (CroniterError, ValueError) as exc:
        raise ConfigError(
            f"schedule {schedule!r}: cron {cron!r} is not valid: {_cron_problem(cron, exc)}; "
            f"fields: {CRON_FIELDS}"
        ) from None


def _cron_problem(cron: str, error: Exception) -> str:
    """Name the first field croniter refuses on its own, else croniter's own words."""
    fields = cron.split()
    if len(fields) == 5:
        for index, (text, name) in enumerate(zip(fields, CRON_FIELDS.split(), strict=True)):
            alone = ["*"] * 5
            alone[index] = text
            try:
                croniter(" ".join(alone))
            except (CroniterError, ValueError):
                return f"the {name} field {text!r} is out of range or malformed"
    return str(error).replace(f"[{cron}] ", "")
