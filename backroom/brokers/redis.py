"""The Redis broker (redis://, rediss://, unix://, redis+sentinel://): production and many
machines. Every state change is one Lua script (lua/*.lua), so two workers never hold one
job's lease and a crash never leaves half a change; reads are served by indexes, never KEYS."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis
from redis.client import PubSub
from redis.commands.core import Script
from redis.connection import AbstractConnection
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.utils import HIREDIS_AVAILABLE

from backroom.brokers.base import (
    FAILURE_MESSAGE_CHARS,
    Broker,
    Claim,
    Failure,
    FailureGroup,
    JobQuery,
    JobRecord,
    Outcome,
    Stats,
    TimelinePoint,
    WorkerInfo,
    reason_category,
    started_of,
)
from backroom.brokers.redis_connect import RedisLink, RedisSettings, describe, parse_url
from backroom.brokers.redis_scripts import (
    enqueue_row,
    failure_groups_of,
    lua_sources,
    pack,
    record_of,
    restored_envelope,
    running_state,
    stats_of,
    timeline_of,
    unpack,
)
from backroom.envelope import FINAL_STATES, Envelope, State, encode_json
from backroom.errors import BadEnvelope, BrokerError, ConfigError

logger = logging.getLogger("backroom")

WAITER_GRACE_S = 60.0  # a wait_finished registration outlives its deadline by this much
BLOCK_SLICE_S = 1.0  # wait_finished re-reads the record at least this often
MAX_BLOCK_S = 5.0  # no blocking read asks for more (the socket timeout is 10 s)
# An offer to take work (claim(offer=True)) lives this long, and a job handed over under it is
# leased this long until its worker renews the lease on receipt. Workers claim again at least
# every second or so while they have room (which renews the offer), so a worker that died is
# offered jobs for at most this long, and they come back this long after.
OFFER_S = 5.0
_worker_decoder = msgspec.json.Decoder(dict[str, Any])

# What redis-py packs a command with when hiredis is there (the same bytes as its own packer),
# called without the per-call argument checks that cost more than the packing itself.
_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command

    _pack = pack_command if HIREDIS_AVAILABLE else None
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    _pack = None


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _call_id() -> str:
    return os.urandom(6).hex()


def _escape(queue: str) -> str:
    return queue.replace("%", "%25").replace(":", "%3A")


def _command(connection: AbstractConnection, *args: Any) -> Any:
    """Send one command and read its reply, packed as redis-py's send_command packs it."""
    packed: Sequence[bytes]
    try:
        if _pack is None:
            raise TypeError
        packed = (_pack(args),)
    except TypeError:  # no hiredis; a bytearray, or a type redis-py refuses (DataError)
        packed = connection.pack_command(*args)  # type: ignore[no-untyped-call]
    connection.send_packed_command(packed)  # type: ignore[no-untyped-call]
    return connection.read_response()


def _claims(flat: Sequence[Any], start: int, lease_until: float) -> list[Claim]:
    """Claims from a script's flat reply: [id, envelope, attempts, attempt id, ...] from
    `start` on."""
    claims: list[Claim] = []
    for i in range(start, len(flat), 4):
        job_id, stored, attempts, attempt_id = flat[i : i + 4]
        try:
            envelope = restored_envelope(job_id, stored).with_attempt(attempts)
        except BadEnvelope as exc:
            broken = Envelope(id=job_id, job="?", source="?", attempt=attempts)
            claims.append(Claim(broken, lease_until, attempt_id, broken=str(exc)))
            continue
        claims.append(Claim(envelope, lease_until, attempt_id))
    return claims


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Held:
    """One thread's own connection for script calls."""

    __slots__ = ("__weakref__", "connection", "give_back", "pid")

    def __init__(self, pool: Any) -> None:
        self.connection: AbstractConnection = pool.get_connection()
        self.pid = os.getpid()
        # back to the pool once its thread is gone (or when dropped): threads come and go
        self.give_back = weakref.finalize(self, pool.release, self.connection)


class RedisBroker(Broker):
    """One client (a connection pool) per broker, safe to share between threads. Keys live
    under "{prefix}:" so several apps share one Redis and each app's keys share one Redis
    Cluster slot; docs/redis-keys.md describes the layout."""

    def __init__(self, settings: RedisSettings) -> None:
        self.url = settings.url
        self.display_url = settings.display
        self.prefix = settings.prefix
        self.result_ttl_s = settings.result_ttl_s
        self._base = "{" + settings.prefix + "}"
        self._keys = [self._base + ":j"]
        self._link = RedisLink(settings.display, settings.reconnect_s)
        try:
            self._client: redis.Redis = settings.client()
            self._client.ping()  # fail fast and clearly when Redis was never reachable
        except (ConnectionError, TimeoutError, OSError, ResponseError) as exc:
            raise self._link.failure(exc) from None
        except (ValueError, RedisError) as exc:  # an option redis-py refuses (ssl_cert_reqs=...)
            raise ConfigError(f"broker URL {settings.display!r}: {describe(exc)}") from None
        self._check_eviction()
        self._scripts: dict[str, Script] = {
            name: self._client.register_script(source)
            for name, source in lua_sources(settings.result_ttl_s).items()
        }
        self._own = threading.local()  # each thread's connection for script calls
        self._wait_lock = threading.Lock()
        self._pubsub: PubSub | None = None
        self._subscribed: frozenset[bytes] = frozenset()

    def _check_eviction(self) -> None:
        """A Redis that evicts any key under memory pressure can drop queued jobs: say so."""
        try:
            policy = self._client.info("memory").get("maxmemory_policy", "noeviction")
        except ResponseError:  # INFO denied to this user: nothing to tell
            return
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy.startswith("allkeys"):
            logger.warning("redis at %s evicts keys under memory pressure (maxmemory-policy "
                           "%s): queued jobs can be lost; set maxmemory-policy noeviction",
                           self.display_url, policy)  # fmt: skip

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        return cls(parse_url(url))

    def __repr__(self) -> str:
        return f"RedisBroker({self.display_url!r})"

    # -- plumbing -------------------------------------------------------------------------------
    def _run(self, name: str, *args: Any) -> Any:
        """One Lua script call: one round trip, one atomic step. It goes straight down this
        thread's own connection: redis-py's client layer (pool, hooks) costs more per call than
        the round trip itself, and a single enqueue is exactly one call."""
        script = self._scripts[name]

        def call() -> Any:
            try:
                return self._send("EVALSHA", script.sha, 1, *self._keys, *args)
            except NoScriptError:  # a restarted or failed-over Redis forgot the scripts
                script.sha = self._send("SCRIPT", "LOAD", script.script).decode()
                return self._send("EVALSHA", script.sha, 1, *self._keys, *args)

        return self._link.call(call)

    def _send(self, *args: Any) -> Any:
        """One command down this thread's own connection, and its reply."""
        connection = self._connection()
        try:
            return _command(connection, *args)
        except ResponseError:
            raise  # an error reply: the connection is still in step
        except BaseException:
            self._drop_connection()  # a reply may be pending: never reuse it half-read
            raise

    def _connection(self) -> AbstractConnection:
        held: _Held | None = getattr(self._own, "held", None)
        if held is None or held.pid != os.getpid():  # a new thread, or a forked child
            held = _Held(self._client.connection_pool)
            self._own.held = held
        return held.connection

    def _drop_connection(self) -> None:
        """Closed and back to the pool: the pool's next one connects afresh (and through a
        Sentinel, asks again where the master is)."""
        held: _Held | None = getattr(self._own, "held", None)
        self._own.held = None
        if held is not None and held.pid == os.getpid():
            with contextlib.suppress(Exception):
                held.connection.disconnect()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                held.give_back()

    def _key(self, *parts: str) -> str:
        return ":".join((self._base, *parts))

    def _channel(self, queue: str) -> bytes:
        return self._key("w", _escape(queue)).encode()

    # -- producing ------------------------------------------------------------------------------
    def enqueue(self, envelopes: Sequence[Envelope], now: float | None = None) -> list[str]:
        if not envelopes:
            return []
        now = _now(now)
        blob = pack([enqueue_row(envelope, now) for envelope in envelopes])
        try:
            held = self._run("enqueue", blob, now)
        except BrokerError as exc:
            if "DUPLICATE" in str(exc):
                raise BrokerError(str(exc).replace("DUPLICATE ", "")) from None
            raise
        ids = [envelope.id for envelope in envelopes]
        for i in range(0, len(held), 2):
            ids[int(held[i])] = held[i + 1].decode()
        return ids

    # -- consuming ------------------------------------------------------------------------------
    def claim(
        self,
        queues: Sequence[str],
        worker_id: str,
        lease_s: float,
        limit: int,
        now: float | None = None,
        *,
        offer: bool = False,
    ) -> list[Claim]:
        if limit <= 0 or not queues:
            return []
        now = _now(now)
        lease_until = now + lease_s
        salt = os.urandom(6).hex() + "."
        offer_s = OFFER_S if offer else 0
        reply = self._run("claim", now, lease_until, worker_id, limit, salt, offer_s, *queues)
        return _claims(unpack(reply), 0, lease_until)

    def wait_for_work(
        self, queues: Sequence[str], timeout_s: float, worker_id: str | None = None
    ) -> list[Claim]:
        """With a worker id: blocks on the worker's inbox, where the scripts put the jobs they
        claimed for its offer (and a wake-up when work came some other way): a job enqueued
        into an idle worker reaches it in one push, already claimed. Without one, blocks on the
        queues' notification channels (published when a queue gains work). Never busy-spins."""
        if worker_id is not None:
            return self._wait_inbox(worker_id, timeout_s)
        self._wait_published(queues, timeout_s)
        return []

    def _wait_inbox(self, worker_id: str, timeout_s: float) -> list[Claim]:
        timeout = min(timeout_s, MAX_BLOCK_S)
        if timeout <= 0:
            return []
        try:
            reply = self._send("BLPOP", self._key("i", worker_id), round(timeout, 3))
            if self._link.down:
                self._link.restored()
        except (ConnectionError, TimeoutError, OSError) as exc:
            self._link.lost(exc)
            time.sleep(min(timeout, 0.25))  # Redis is away: back off, then the caller claims
            return []
        return self._handed(reply[1]) if reply else []

    def _handed(self, entry: bytes) -> list[Claim]:
        """An inbox entry: b"" (a wake-up) or msgpack [lease until, id, envelope, attempts,
        attempt id, ...], jobs claimed for this worker."""
        if not entry:
            return []
        flat = unpack(entry)
        return _claims(flat, 1, flat[0])

    def withdraw(self, worker_id: str) -> list[Claim]:
        entries: list[bytes] = self._run("withdraw", worker_id)
        return [claim for entry in entries for claim in self._handed(entry)]

    def _wait_published(self, queues: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        channels = frozenset(self._channel(queue) for queue in queues)
        with self._wait_lock:
            try:
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True
                    )
                if channels != self._subscribed:
                    if self._subscribed - channels:
                        self._pubsub.unsubscribe(*(self._subscribed - channels))
                    if channels - self._subscribed:
                        self._pubsub.subscribe(*(channels - self._subscribed))
                    self._subscribed = channels
                    return  # work may have come before the subscription: let the caller look
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if self._pubsub.get_message(timeout=min(remaining, MAX_BLOCK_S)):
                    while self._pubsub.get_message(timeout=0.0):  # one wake-up for the lot
                        pass
                if self._link.down:
                    self._link.restored()
            except (ConnectionError, TimeoutError, OSError) as exc:
                self._link.lost(exc)
                self._drop_pubsub()
                remaining = deadline - time.monotonic()
                time.sleep(max(0.0, min(remaining, 0.25)))  # Redis is away: back off, then retry

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub, self._subscribed = self._pubsub, None, frozenset()
        if pubsub is not None:
            with contextlib.suppress(ConnectionError, TimeoutError, OSError):
                pubsub.close()

    def extend(self, claims: Sequence[Claim], lease_s: float, now: float | None = None) -> set[str]:
        if not claims:
            return set()
        args: list[Any] = [_now(now) + lease_s]
        for claim in claims:
            args += [claim.id, claim.attempt_id]
        return {job_id.decode() for job_id in self._run("extend", *args)}

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        if not job_ids:
            return set()
        raws: list[bytes | None] = self._link.call(
            lambda: self._client.hmget(self._key("j"), list(job_ids))  # type: ignore[arg-type,return-value]
        )
        return {
            job_id
            for job_id, raw in zip(job_ids, raws, strict=True)
            if running_state(raw) == (True, True)
        }

    def ack(self, outcomes: Sequence[Outcome], now: float | None = None) -> list[bool]:
        if not outcomes:
            return []
        blob = pack([
            (o[0].id, o[0].attempt_id, encode_json(o[1]).decode(), started_of(o) or False)
            for o in outcomes
        ])  # fmt: skip
        return [bool(done) for done in self._run("ack", _now(now), _call_id(), blob)]

    def nack(
        self, claim: Claim, failure: Failure, retry_at: float | None, now: float | None = None
    ) -> bool:
        return bool(
            self._run(
                "nack",
                _now(now),
                _call_id(),
                claim.id,
                claim.attempt_id,
                "" if retry_at is None else retry_at,
                failure.type,
                failure.message,
                failure.traceback,
                failure.message[:FAILURE_MESSAGE_CHARS],
            )
        )

    def reject(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        args = (_now(now), _call_id(), claim.id, claim.attempt_id, reason)
        return bool(self._run("reject", *args, reason_category(reason)))

    def finish_cancelled(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        args = (_now(now), _call_id(), claim.id, claim.attempt_id, reason)
        return bool(self._run("finish_cancelled", *args))

    def release(self, claims: Sequence[Claim], now: float | None = None) -> int:
        if not claims:
            return 0
        args: list[Any] = [_now(now)]
        for claim in claims:
            args += [claim.id, claim.attempt_id]
        return int(self._run("release", *args))

    def progress(
        self, claim: Claim, fraction: float, message: str | None, now: float | None = None
    ) -> bool:
        fraction = min(max(fraction, 0.0), 1.0)
        args = (claim.id, claim.attempt_id, fraction, message or "", int(message is not None))
        return bool(self._run("progress", *args))

    # -- control --------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "cancelled", now: float | None = None) -> bool:
        return bool(self._run("cancel", _now(now), job_id, reason))

    def retry(self, job_id: str, now: float | None = None) -> bool:
        return bool(self._run("retry", _now(now), job_id))

    def delete(self, job_ids: Sequence[str]) -> int:
        return int(self._run("delete", *job_ids)) if job_ids else 0

    def pause(self, queue: str) -> None:
        self._link.call(lambda: self._client.sadd(self._key("paused"), queue))

    def resume(self, queue: str) -> None:
        self._run("resume", queue)

    def paused(self) -> set[str]:
        members: set[bytes] = self._link.call(
            lambda: self._client.smembers(self._key("paused"))  # type: ignore[arg-type,return-value]
        )
        return {member.decode() for member in members}

    # -- time -----------------------------------------------------------------------------------
    def promote_due(self, now: float | None = None, limit: int = 1000) -> int:
        return int(self._run("promote", _now(now), limit))

    def sweep_expired(self, now: float | None = None, limit: int = 1000) -> list[str]:
        """Also forgets finished jobs older than the result ttl (dead and rejected: 4x)."""
        now = _now(now)
        ttl = self.result_ttl_s
        waiters_before = time.time() - WAITER_GRACE_S
        ids = self._run("sweep", now, limit, now - ttl, now - 4 * ttl, waiters_before)
        return [job_id.decode() for job_id in ids]

    def fire_once(self, schedule: str, tick: float) -> bool:
        return bool(self._run("fire_once", schedule, tick))

    def last_fired(self, schedule: str) -> float | None:
        tick = self._link.call(lambda: self._client.hget(self._key("fired"), schedule))
        return None if tick is None else float(tick)

    def prune(self, finished_before: float, states: Sequence[State], limit: int = 1000) -> int:
        wanted = [str(State(s)) for s in states if State(s) in FINAL_STATES]
        if not wanted or limit <= 0:
            return 0
        return int(self._run("prune", finished_before, limit, *wanted))

    # -- reading --------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []

        def read() -> list[Any]:
            with self._client.pipeline(transaction=True) as pipe:  # both reads see one moment
                pipe.hmget(self._key("j"), list(job_ids))
                pipe.mget([self._key("d", job_id) for job_id in job_ids])
                result: list[Any] = pipe.execute()
                return result

        live, finished = self._link.call(read)
        return [
            None if raw is None else record_of(job_id, raw)
            for job_id, raw in (
                (job_id, a if a is not None else b)
                for job_id, a, b in zip(job_ids, live, finished, strict=True)
            )
        ]

    def jobs(self, query: JobQuery) -> list[JobRecord]:
        limit = max(0, min(query.limit, 1000))
        if limit == 0:
            return []
        flat = self._run(
            "jobs",
            "" if query.state is None else str(State(query.state)),
            query.job or "",
            query.tag or "",
            limit,
            query.before or "",
        )
        return [record_of(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    def wait_finished(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Registers in P:wait, so the script that finishes the job pushes to P:done:<id>;
        blocks there (BLPOP) instead of polling."""
        record = self.get(job_id)
        if record is None or record.state in FINAL_STATES or timeout_s <= 0:
            return record
        deadline = time.monotonic() + timeout_s
        waiters, done = self._key("wait"), self._key("done", job_id)
        until = time.time() + timeout_s + WAITER_GRACE_S
        self._link.call(lambda: self._client.zadd(waiters, {job_id: until}, gt=True))
        while True:
            record = self.get(job_id)
            remaining = deadline - time.monotonic()
            if record is None or record.state in FINAL_STATES or remaining <= 0:
                return record
            wait = max(0.001, min(remaining, BLOCK_SLICE_S))
            self._link.call(lambda: self._client.blpop([done], timeout=wait))  # noqa: B023

    def stats(self, tags: bool = False) -> Stats:
        def read() -> list[Any]:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key("c"))
                pipe.hgetall(self._key("h"))
                if tags:
                    pipe.hgetall(self._key("T"))
                result: list[Any] = pipe.execute()
                return result

        return stats_of(*self._link.call(read))

    def timeline(self, since: float, now: float | None = None) -> list[TimelinePoint]:
        """One HGETALL per minute (at most TIMELINE_KEEP_MINUTES + 1), in one round trip."""

        def read(minutes: Sequence[int]) -> list[Any]:
            def pipelined() -> list[Any]:
                with self._client.pipeline(transaction=False) as pipe:
                    for minute in minutes:
                        pipe.hgetall(self._key("m", str(minute)))
                    result: list[Any] = pipe.execute()
                    return result

            return self._link.call(pipelined)

        return timeline_of(since, _now(now), read)

    def failure_groups(self, limit: int = 100) -> list[FailureGroup]:
        groups = self._link.call(lambda: self._client.hgetall(self._key("F")))
        return failure_groups_of(groups, limit)  # type: ignore[arg-type]

    # -- workers --------------------------------------------------------------------------------
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        body = msgspec.json.encode(msgspec.to_builtins(info))
        value = repr(info.seen_at + ttl_s).encode() + b"\0" + body
        key = self._key("workers")

        def register() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(key, info.id, value)
                pipe.hgetall(key)
                _, everyone = pipe.execute()
            cutoff = info.seen_at - 3600
            stale = [w for w, v in everyone.items() if float(v.split(b"\0", 1)[0]) < cutoff]
            if stale:
                self._client.hdel(key, *stale)

        self._link.call(register)

    def unregister_worker(self, worker_id: str) -> None:
        self._link.call(lambda: self._client.hdel(self._key("workers"), worker_id))

    def workers(self, now: float | None = None) -> list[WorkerInfo]:
        now = _now(now)
        everyone: dict[bytes, bytes] = self._link.call(
            lambda: self._client.hgetall(self._key("workers"))  # type: ignore[arg-type,return-value]
        )
        found: list[WorkerInfo] = []
        for value in everyone.values():
            expires_at, _, body = value.partition(b"\0")
            if float(expires_at) <= now:
                continue
            data = _worker_decoder.decode(body)
            data["queues"] = tuple(data["queues"])
            data["current"] = tuple(data.get("current", ()))
            found.append(WorkerInfo(**data))
        return sorted(found, key=lambda worker: worker.id)

    # -- housekeeping ---------------------------------------------------------------------------
    def purge(self) -> None:
        """Deletes every key under this broker's prefix (a SCAN: for tests and resets only)."""
        pattern = _glob_escape(self._base) + ":*"

        def purge() -> None:
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._client.unlink(*batch)
                    batch = []
            if batch:
                self._client.unlink(*batch)

        self._link.call(purge)

    def close(self) -> None:
        with self._wait_lock:
            self._drop_pubsub()
        try:
            self._client.close()
            self._client.connection_pool.disconnect()
        except (ConnectionError, TimeoutError, OSError):
            pass
