"""Cron schedules: parsing, next fire times, and turning each due tick into exactly one job,
however many schedulers run. Delayed jobs need no scheduler: every worker promotes them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, croniter

from backroom.errors import ConfigError

if TYPE_CHECKING:
    from backroom.app import App

logger = logging.getLogger("backroom.scheduler")

TICK_KEY_HOLD_S = 7 * 86400.0  # how long a tick's unique key keeps a second scheduler out


@dataclass(frozen=True)
class Schedule:
    """A job run on a cron expression (five fields) in a time zone, with a fixed payload."""

    name: str
    job: str
    cron: str
    payload: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}; "
                "use an IANA name such as 'Europe/Berlin' or 'UTC'"
            ) from None
        if not croniter.is_valid(self.cron):
            raise ConfigError(
                f"schedule {self.name!r}: {self.cron!r} is not a cron expression; "
                "use five fields: minute hour day-of-month month day-of-week"
            )

    def _iter(self, after: float) -> croniter:
        try:
            start = datetime.fromtimestamp(after, ZoneInfo(self.timezone))
            return croniter(self.cron, start)
        except CroniterBadCronError as exc:  # pragma: no cover - checked in __post_init__
            raise ConfigError(f"schedule {self.name!r}: {exc}") from None

    def next_after(self, moment: float) -> float:
        """The first tick strictly after `moment` (Unix seconds)."""
        return float(self._iter(moment).get_next(float))

    def latest_at_or_before(self, moment: float) -> float:
        """The last tick at or before `moment`."""
        return float(self._iter(moment + 1e-3).get_prev(float))

    def describe(self, last_fired: float | None, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job,
            "cron": self.cron,
            "timezone": self.timezone,
            "payload": self.payload,
            "tags": list(self.tags),
            "last_run": last_fired,
            "next_run": self.next_after(now),
        }


class Scheduler:
    """Fires the app's schedules. Missed-tick policy: after downtime a schedule fires once, for
    its latest missed tick, not once per missed tick. Each fire is one enqueue with a unique key
    per (schedule, tick), so two schedulers racing on one tick create one job; the broker's
    `fire_once` then records the tick as the schedule's last run."""

    def __init__(self, app: App, started_at: float | None = None) -> None:
        self.app = app
        self.started_at = time.time() if started_at is None else started_at

    def tick(self, now: float | None = None) -> int:
        """Fire every schedule whose next tick has come. Returns how many jobs this created."""
        now = time.time() if now is None else now
        created = 0
        for schedule in self.app.schedules.values():
            last = self.app.broker.last_fired(schedule.name)
            due = schedule.next_after(self.started_at if last is None else last)
            if due > now:
                continue
            tick = schedule.latest_at_or_before(now)  # missed ticks collapse into the latest
            envelope = self.app.envelope(
                schedule.job, schedule.payload, source="scheduler", tags=schedule.tags,
                unique_key=f"schedule:{schedule.name}:{tick:.0f}", unique_for=TICK_KEY_HOLD_S,
                now=now,
            )  # fmt: skip
            [job_id] = self.app.broker.enqueue([envelope], now=now)
            if self.app.broker.fire_once(schedule.name, tick) and job_id == envelope.id:
                created += 1
                logger.info("schedule %s fired for %s: job %s", schedule.name,
                            datetime.fromtimestamp(tick).isoformat(), job_id)  # fmt: skip
        return created

    def run(self, stop: Any = None) -> None:
        """Tick every second until `stop` (a threading.Event) is set."""
        while stop is None or not stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("scheduler tick failed; retrying in a second")
            if stop is not None:
                stop.wait(1.0)
            else:
                time.sleep(1.0)
