"""App (registry, configuration, enqueue and schedule entry points), Handle (one job seen from a
producer) and Context (what a running job receives). Policy lives here; brokers only store."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import msgspec

from backroom.brokers import Broker, connect
from backroom.brokers.base import Claim, JobRecord
from backroom.envelope import (
    FINAL_STATES,
    JSON,
    MAX_NESTING,
    Envelope,
    State,
    new_id,
    new_ids,
    too_deep,
)
from backroom.errors import (
    BackroomError,
    ConfigError,
    InvalidPayload,
    JobFailed,
    JobNotFound,
    PayloadTooLarge,
    ResultTimeout,
)
from backroom.jobs import Backoff, JobSpec, Registry, build_spec
from backroom.security import Keyring, KeySpec, Redactor

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from backroom.scheduler import Schedule

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL = "sqlite:///backroom.db"
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
UNIQUE_MODES = ("start", "finish")

Hook = Callable[[Envelope, BaseException], None]


class Options(TypedDict, total=False):
    """The keywords of `enqueue`, `enqueue_many` and `envelope` (see the README's table)."""

    delay: float | None  # seconds from now
    at: datetime | None  # a moment (a naive datetime is local time)
    expires: float | datetime | None  # never started after this: seconds from now, or a moment
    tags: Iterable[str]
    unique_key: str | None
    unique_for: str | float | None  # "start", "finish" or seconds
    queue: str | None
    priority: int | None  # higher runs earlier
    then: str | None  # the follow-up job, given this one's result
    source: str | None  # who enqueues (default: the App's source)
    now: float | None  # the clock, for tests


OPTION_NAMES = frozenset(Options.__annotations__)
logger = logging.getLogger("backroom")


class App:
    """One application's worker space: its jobs, schedules, broker and configuration.

    `url` picks the broker (default `$BACKROOM_URL`, else `sqlite:///backroom.db`); `source` is
    this process's identity as a producer. `keys` maps a source to its signing keys (newest
    first; default `$BACKROOM_KEYS`, see security.Keyring): when any are set, producers sign
    with their source's newest key and workers accept only envelopes signed with a key of the
    source they claim. `max_payload_bytes` caps a payload's JSON size; `secret_fields` (a
    regular expression or field names; default `$BACKROOM_SECRET_FIELDS`, else password, token,
    secret, api_key ...) names the payload fields masked wherever a job is shown.
    `config` is the worker's own configuration handed to jobs as `ctx.config` (never carried in
    an envelope); by default it is read from the JSON file named by `$BACKROOM_CONFIG`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        source: str = "cli",
        config: Mapping[str, Any] | None = None,
        keys: KeySpec | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        secret_fields: str | Iterable[str] | None = None,
    ) -> None:
        self.url = url or os.environ.get("BACKROOM_URL") or DEFAULT_URL
        self.source = source
        self.registry = Registry()
        self.schedules: dict[str, Schedule] = {}
        self._config = dict(config) if config is not None else None
        self.keys = Keyring.from_env() if keys is None else Keyring(keys)
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int):
            raise ConfigError(f"max_payload_bytes must be an int, got {max_payload_bytes!r}")
        if max_payload_bytes < 1:
            raise ConfigError(f"max_payload_bytes must be at least 1, got {max_payload_bytes}")
        self.max_payload_bytes = max_payload_bytes
        self.redactor = Redactor(secret_fields)
        self._broker: Broker | None = None
        self._broker_lock = threading.Lock()
        # job -> (spec, source, template but created_at) of a call without keywords: _template
        self._plain: dict[str, tuple[JobSpec, str, Envelope]] = {}
        self.failure_hooks: list[Hook] = []
        self.reject_hooks: list[Hook] = []
        self.dead_hooks: list[Hook] = []

    # -- configuration ---------------------------------------------------------------------------
    @property
    def broker(self) -> Broker:
        """The broker, connected on first use (so importing an app module never dials out)."""
        if self._broker is None:
            with self._broker_lock:
                if self._broker is None:
                    self._broker = connect(self.url)
        return self._broker

    def use_broker(self, broker: Broker) -> None:
        """Share an already connected broker (tests, embedding)."""
        self._broker = broker
        self.url = broker.url

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = _load_config(os.environ.get("BACKROOM_CONFIG"))
        return self._config

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    # -- registering -----------------------------------------------------------------------------
    def job(
        self,
        name: str | None = None,
        *,
        sources: Iterable[str] | None = None,
        retries: int = 3,
        retry_backoff: Backoff = 1.0,
        timeout: float | None = None,
        queue: str = "default",
        priority: int = 0,
        tags: Iterable[str] = (),
    ) -> Callable[[F], F]:
        """Register a function as a job. The name defaults to the function's name; `sources`
        limits who may schedule it; the payload is checked against the type hints."""

        def register(function: F) -> F:
            spec = build_spec(
                function, name, sources=sources, retries=retries, retry_backoff=retry_backoff,
                timeout=timeout, queue=queue, priority=priority, tags=tuple(tags),
            )  # fmt: skip
            self.registry.add(spec)
            return function

        if callable(name):  # used bare: @app.job
            function, name = name, None
            return register(function)
        return register

    def schedule(
        self,
        job: str,
        cron: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timezone: str = "UTC",
        name: str | None = None,
        tags: Iterable[str] = (),
    ) -> Schedule:
        """Run `job` on a cron schedule (five fields, in `timezone`). Its jobs carry source
        "scheduler"; exactly one job is created per tick however many schedulers run."""
        from backroom.scheduler import Schedule

        spec = self.registry.get(job)
        spec.check_source("scheduler")
        spec.validate(dict(payload or {}))
        entry = Schedule(
            name=name or job, job=job, cron=cron, payload=dict(payload or {}),
            timezone=timezone, tags=tuple(tags),
        )  # fmt: skip
        if entry.name in self.schedules:
            raise ConfigError(
                f"schedule {entry.name!r} is declared twice; pass name= to tell apart"
            )
        self.schedules[entry.name] = entry
        return entry

    def on_failure(self, hook: Hook) -> Hook:
        """Call `hook(envelope, exception)` whenever an attempt fails (retrying or dead) and
        when a worker rejects an envelope: an error reporter hooked here misses nothing."""
        self.failure_hooks.append(hook)
        return hook

    def on_reject(self, hook: Hook) -> Hook:
        """Call `hook(envelope, error)` when a worker rejects an envelope (failed check)."""
        self.reject_hooks.append(hook)
        return hook

    def on_dead(self, hook: Hook) -> Hook:
        """Call `hook(envelope, exception)` when a job runs out of retries."""
        self.dead_hooks.append(hook)
        return hook

    # -- producing -------------------------------------------------------------------------------
    def envelope(
        self, job: str, payload: Mapping[str, Any] | None = None, **options: Unpack[Options]
    ) -> Envelope:
        """Check and build one envelope (without storing it). Raises UnknownJob,
        SourceNotAllowed, InvalidPayload or PayloadTooLarge naming what was wrong; the keywords
        are `Options`."""
        spec, template = self._template(job, options)
        return self._envelope(spec, template, payload, new_id())

    def _template(self, job: str, options: Options) -> tuple[JobSpec, Envelope]:
        """What the envelopes of one call share, checked once: the job, its source and the
        options, as an envelope without id and payload (enqueue_many builds a thousand
        envelopes from one; `_envelope` fills in each, which costs less than building anew)."""
        if not options:  # the usual call: all but the clock depends on the job and source alone
            spec = self.registry.get(job)
            source = self.source
            plain = self._plain.get(job)
            if plain is None or plain[0] is not spec or plain[1] != source:
                spec.check_source(source)
                shared = Envelope(
                    id="", job=job, source=source, tags=_tags(spec.tags, ()), queue=spec.queue,
                    priority=spec.priority, max_retries=spec.retries, timeout=spec.timeout,
                )  # fmt: skip
                plain = self._plain[job] = (spec, source, shared)
            return spec, msgspec.structs.replace(plain[2], created_at=time.time())
        unknown = options.keys() - OPTION_NAMES
        if unknown:
            raise TypeError(f"unexpected keyword {sorted(unknown)[0]!r}; the options are "
                            f"{', '.join(sorted(OPTION_NAMES))}")  # fmt: skip
        spec = self.registry.get(job)
        source = options.get("source") or self.source
        spec.check_source(source)
        then = options.get("then")
        if then is not None:  # the follow-up's source will be "job:<this job>"
            self.registry.get(then).check_source(f"job:{job}")
        now = options.get("now")
        unique_key, priority = options.get("unique_key"), options.get("priority")
        created = time.time() if now is None else now
        template = Envelope(
            id="",
            job=job,
            source=source,
            tags=_tags(spec.tags, options.get("tags", ())),
            queue=options.get("queue") or spec.queue,
            priority=spec.priority if priority is None else int(priority),
            max_retries=spec.retries,
            timeout=spec.timeout,
            eta=_eta(options.get("delay"), options.get("at"), created),
            expires=_expires(options.get("expires"), created),
            unique_key=unique_key,
            unique_for=_unique_for(options.get("unique_for"), unique_key),
            then=then,
            created_at=created,
        )
        return spec, template

    def _envelope(
        self,
        spec: JobSpec,
        template: Envelope,
        payload: Mapping[str, Any] | None,
        job_id: str,
    ) -> Envelope:
        """One payload, checked, in `_template`'s envelope under its id, signed."""
        body = {} if payload is None else payload
        if type(body) is not dict and isinstance(body, Mapping):
            body = dict(body)  # (a dict is only read here: no copy)
        if type(body) is dict and body and too_deep(body):
            raise InvalidPayload(spec.name, None, f"nests more than {MAX_NESTING} levels deep")
        spec.check(body)
        self.check_size(spec.name, body)
        return self.sign(msgspec.structs.replace(template, id=job_id, payload=dict(body)))

    def sign(self, envelope: Envelope) -> Envelope:
        """Sign with the newest key of the envelope's source. Unchanged when no keys are
        configured; ConfigError when keys are but none covers this source."""
        return self.keys.sign(envelope)

    def check_size(self, job: str, payload: Mapping[str, Any]) -> None:
        """Raise PayloadTooLarge when the payload's JSON is over `max_payload_bytes`."""
        size = len(msgspec.json.encode(payload))
        if size > self.max_payload_bytes:
            raise PayloadTooLarge(job, size, self.max_payload_bytes)

    def verify(self, envelope: Envelope) -> None:
        """The worker-side security checks of an envelope: its signature proves its source
        (BadSignature; only when keys are configured) and its payload is within the size limit
        (PayloadTooLarge)."""
        self.keys.verify(envelope)
        self.check_size(envelope.job, envelope.payload)

    def enqueue(
        self, job: str, payload: Mapping[str, Any] | None = None, **options: Unpack[Options]
    ) -> Handle:
        """Check and enqueue one job; returns its Handle (the existing job's, when `unique_key`
        is held by a live job). See `envelope` for the keywords."""
        spec, template = self._template(job, options)  # as `envelope` does, minus a call
        envelope = self._envelope(spec, template, payload, new_id())
        [job_id] = self.broker.enqueue([envelope], now=options.get("now"))
        return Handle(self, job_id)

    def enqueue_many(
        self, job: str, payloads: Iterable[Mapping[str, Any]], **options: Unpack[Options]
    ) -> list[Handle]:
        """Check every payload first (one bad payload raises before anything is stored), then
        enqueue them all in one broker round trip. Handles come back in order."""
        spec, template = self._template(job, options)
        payloads = list(payloads)
        ids = new_ids(len(payloads))
        envelopes = []
        for index, (payload, job_id) in enumerate(zip(payloads, ids, strict=True)):
            try:
                envelopes.append(self._envelope(spec, template, payload, job_id))
            except InvalidPayload as exc:
                raise InvalidPayload(job, exc.field, f"{exc.problem} (payload #{index})") from None
        ids = self.broker.enqueue(envelopes, now=options.get("now")) if envelopes else []
        return [Handle(self, job_id) for job_id in ids]

    def handle(self, job_id: str) -> Handle:
        """The Handle of an existing job (checked lazily: its methods raise JobNotFound)."""
        return Handle(self, job_id)

    # -- reading ---------------------------------------------------------------------------------
    def redact(self, value: JSON) -> JSON:
        """A copy of a payload with secret-looking fields (password, token, api_key ...) masked."""
        return self.redactor.redact(value)

    def describe(self, record: JobRecord) -> dict[str, Any]:
        """A job record as a JSON-ready dict, payload redacted: what status/info/the API show."""
        env = record.envelope
        scrub = self.redactor.scrub  # secrets echoed in messages (a bad value, an exception)
        started, finished = record.started_at, record.finished_at
        wait = started - record.queued_at if started and record.queued_at else None
        return {
            "id": record.id,
            "job": env.job,
            "state": str(record.state),
            "source": env.source,
            "tags": list(env.tags),
            "queue": env.queue,
            "priority": env.priority,
            "payload": self.redact(env.payload),
            "attempts": record.attempts,
            "max_retries": env.max_retries,
            "progress": record.progress,
            "progress_message": scrub(record.progress_message, env.payload),
            "created_at": record.created_at,
            "queued_at": record.queued_at,
            "started_at": started,
            "finished_at": finished,
            "eta": env.eta,
            "expires": env.expires,
            "wait_time": wait,
            "run_time": finished - started if finished and started else None,
            "unique_key": env.unique_key,
            "result": self.redact(record.result),
            "error": None
            if record.error is None
            else {
                "type": record.error.type,
                "message": scrub(record.error.message, env.payload),
                "traceback": scrub(record.error.traceback, env.payload),
            },
            "reason": scrub(record.reason, env.payload),
            "worker_id": record.worker_id,
            "cancel_requested": record.cancel_requested,
        }

    def run_worker(self, **options: Any) -> int:
        """Run a worker in this process (in-process, no child processes); with burst=True it
        returns once no job is queued or running. Handy in tests and scripts."""
        from backroom.worker import Worker

        return Worker(self, **options).run()

    def __repr__(self) -> str:
        return f"App({self.url!r}, source={self.source!r}, jobs={list(self.registry.names())})"


class Handle:
    """One job seen from a producer: its id, state, info, result; cancel it."""

    def __init__(self, app: App, job_id: str) -> None:
        self.app, self.id = app, job_id

    def _record(self) -> JobRecord:
        record = self.app.broker.get(self.id)
        if record is None:
            raise JobNotFound(self.id)
        return record

    def status(self) -> str:
        """The job's state: "scheduled", "queued", "running", "succeeded", "retrying", "dead",
        "cancelled" or "rejected"."""
        return str(self._record().state)

    def info(self) -> dict[str, Any]:
        """State, attempts, progress, timings, error, tags, source and the redacted payload."""
        return self.app.describe(self._record())

    def result(self, timeout: float | None = None) -> JSON:
        """Wait for the job to finish and return its result. Raises JobFailed when it ended dead,
        rejected or cancelled, ResultTimeout (a TimeoutError) when `timeout` ran out."""
        limit = float("inf") if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + limit
        while True:
            wait = min(deadline - time.monotonic(), 3600.0)
            record = self.app.broker.wait_finished(self.id, max(0.0, wait))
            if record is None:
                raise JobNotFound(self.id)
            if record.state in FINAL_STATES or time.monotonic() >= deadline:
                break
        if record.state == State.SUCCEEDED:
            return record.result
        if record.state not in FINAL_STATES:
            raise ResultTimeout(self.id, limit, str(record.state))
        if record.error is not None and record.state == State.DEAD:
            error = record.error
            raise JobFailed(self.id, str(record.state), error.type, error.message, error.traceback)
        raise JobFailed(self.id, str(record.state), str(record.state), record.reason or "")

    def cancel(self) -> bool:
        """True if the job will not run (or, where it was running, has been told to stop)."""
        return self.app.broker.cancel(self.id, reason=f"cancelled by {self.app.source}")

    def __repr__(self) -> str:
        return f"Handle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


class Context:
    """What a running job receives as its first parameter: who it is, its configuration, and
    ways to report progress, enqueue follow-up work and notice cancellation."""

    def __init__(self, app: App, claim: Claim, spec: JobSpec) -> None:
        self.app, self._claim, self._spec = app, claim, spec
        envelope = claim.envelope
        self.job_id: str = envelope.id
        self.job: str = envelope.job
        self.attempt: int = envelope.attempt
        self.source: str = envelope.source
        self.tags: tuple[str, ...] = envelope.tags
        self.payload: dict[str, Any] = envelope.payload
        self._cancelled = False  # set by the worker, from another thread: a plain flag will do
        self._last_progress = 0.0

    @functools.cached_property
    def logger(self) -> logging.Logger:
        """The job's logger, `backroom.job.<name>` (looked up on first use)."""
        return logging.getLogger(f"backroom.job.{self.job}")

    @property
    def config(self) -> dict[str, Any]:
        """The worker's own configuration (never carried in the envelope)."""
        return self.app.config

    @property
    def cancelled(self) -> bool:
        """True once someone asked to cancel this job: stop cooperatively and return."""
        return self._cancelled

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record how far the job got (0..1) and what it is doing, shown by status and the
        dashboard. Writes are throttled to a few per second; 0 and 1 always go through."""
        fraction = min(1.0, max(0.0, float(fraction)))
        moment = time.monotonic()
        if 0.0 < fraction < 1.0 and moment - self._last_progress < 0.2:
            return
        self._last_progress = moment
        self.app.broker.progress(self._claim, fraction, message)

    def enqueue(self, job: str, payload: Mapping[str, Any] | None = None, **options: Any) -> Handle:
        """Enqueue another job from this one; its source is `job:<this job's name>`."""
        options.setdefault("source", f"job:{self.job}")
        return self.app.enqueue(job, payload, **options)


# -- helpers ---------------------------------------------------------------------------------------


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"BACKROOM_CONFIG {path!r} cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"BACKROOM_CONFIG {path!r} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"BACKROOM_CONFIG {path!r} must hold a JSON object")
    return loaded


def _timestamp(value: datetime) -> float:
    return value.timestamp()  # a naive datetime means local time, as everywhere in Python


def _eta(delay: float | None, at: datetime | None, now: float) -> float | None:
    if delay is not None and at is not None:
        raise BackroomError("pass either delay= or at=, not both")
    if delay is not None:
        if not isinstance(delay, int | float) or delay < 0:
            raise BackroomError(f"delay must be a number of seconds >= 0, got {delay!r}")
        return now + delay if delay > 0 else None
    if at is not None:
        if not isinstance(at, datetime):
            raise BackroomError(f"at must be a datetime, got {at!r}")
        eta = _timestamp(at)
        return eta if eta > now else None
    return None


def _expires(value: float | datetime | None, now: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _timestamp(value)
    if not isinstance(value, int | float) or value <= 0:
        raise BackroomError(f"expires must be seconds > 0 or a datetime, got {value!r}")
    return now + value


def _unique_for(value: str | float | None, key: str | None) -> str | float | None:
    if value is None:
        return None
    if key is None:
        raise BackroomError("unique_for needs a unique_key")
    if isinstance(value, str):
        if value not in UNIQUE_MODES:
            raise BackroomError(
                f"unique_for must be 'start', 'finish' or a number of seconds, got {value!r}"
            )
        return None if value == "finish" else value
    if not isinstance(value, int | float) or value <= 0:
        raise BackroomError(f"unique_for seconds must be > 0, got {value!r}")
    return float(value)


def _tags(defaults: Iterable[str], extra: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extra, str):
        extra = [extra]
    merged: dict[str, None] = {}
    for tag in (*defaults, *extra):
        if not isinstance(tag, str) or not tag:
            raise BackroomError(f"tags must be non-empty strings, got {tag!r}")
        merged[tag] = None
    return tuple(merged)
