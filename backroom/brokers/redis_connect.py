"""Redis broker URLs -> a redis-py client, and the reconnect policy: a dropped connection is
logged once, retried with exponential backoff for a while, then reported as BrokerError."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry

from backroom.errors import BrokerError, ConfigError

logger = logging.getLogger("backroom")

T = TypeVar("T")

DEFAULT_PREFIX = "backroom"
DEFAULT_RESULT_TTL_S = 7 * 24 * 3600.0
DEFAULT_RECONNECT_S = 30.0
# Connections opened before an outage fail once each after it; within this many seconds of
# reconnecting, such a failure is the same outage and is not logged again.
SAME_OUTAGE_S = 30.0
SENTINEL_PORT = 26379
OUR_PARAMETERS = ("prefix", "result_ttl", "reconnect_s", "sentinel_password")


@dataclass(frozen=True)
class RedisSettings:
    """What a broker URL says: where Redis is (a client factory) and our own parameters."""

    url: str  # as given: connect(url) opens the same store again
    display: str  # for messages: the password masked
    prefix: str
    result_ttl_s: float
    reconnect_s: float
    client: Callable[[], redis.Redis]


def _client_options() -> dict[str, Any]:
    return {
        "decode_responses": False,
        "socket_connect_timeout": 5.0,
        "socket_timeout": 10.0,  # blocking waits never ask for more than a few seconds
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),  # RedisLink retries whole operations instead
    }


def masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _positive(url: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"broker URL {masked(url)!r}: {name} must be a positive number of "
                          f"seconds, got {text!r}")  # fmt: skip
    return value


def parse_url(url: str) -> RedisSettings:
    """redis://[user:password@]host:port/db, rediss://... (TLS), unix:///path.sock?db=N, and
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]. Our own query
    parameters: prefix (default "backroom"), result_ttl (seconds, default 7 days; dead and
    rejected jobs are kept 4x longer), reconnect_s (default 30), sentinel_password."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    ours = {name: query.pop(name)[-1] for name in OUR_PARAMETERS if name in query}
    prefix = ours.get("prefix", DEFAULT_PREFIX)
    if not prefix or any(c in prefix for c in "{}"):
        raise ConfigError(f"broker URL {masked(url)!r}: prefix must be a non-empty name "
                          f"without braces, got {prefix!r}")  # fmt: skip
    ttl = _positive(url, "result_ttl", ours.get("result_ttl", str(DEFAULT_RESULT_TTL_S)))
    reconnect = _positive(url, "reconnect_s", ours.get("reconnect_s", str(DEFAULT_RECONNECT_S)))
    rest = parts._replace(query=urlencode(query, doseq=True))
    if parts.scheme == "redis+sentinel":
        factory = _sentinel_factory(url, rest.netloc, rest.path, ours.get("sentinel_password"))
    else:
        plain = url.partition("?")[0] + (f"?{rest.query}" if rest.query else "")
        try:  # parse now, so a bad URL fails here rather than at first use
            redis.connection.parse_url(plain)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ConfigError(f"broker URL {masked(url)!r} is not a Redis URL: {exc}") from None

        options = _client_options()
        if parts.scheme == "unix":
            del options["socket_keepalive"]  # a TCP option

        def factory() -> redis.Redis:
            return redis.Redis.from_url(plain, **options)

    return RedisSettings(url, masked(url), prefix, ttl, reconnect, factory)


def _sentinel_factory(
    url: str, netloc: str, path: str, sentinel_password: str | None
) -> Callable[[], redis.Redis]:
    from redis.sentinel import Sentinel

    credentials, _, hosts_text = netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    hosts: list[tuple[str, int]] = []
    for item in hosts_text.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            hosts.append((host.strip("[]") or "localhost", int(port or SENTINEL_PORT)))
        except ValueError:
            raise ConfigError(
                f"broker URL {masked(url)!r}: bad sentinel address {item!r}"
            ) from None
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ConfigError(f"broker URL {masked(url)!r} names no sentinel service; use "
                          "redis+sentinel://HOST:26379/SERVICE_NAME[/DB]")  # fmt: skip
    service, db = unquote(segments[0]), int(segments[1]) if len(segments) == 2 else 0
    options = _client_options()

    def factory() -> redis.Redis:
        sentinel_options: dict[str, Any] = {"socket_connect_timeout": 5.0, "socket_timeout": 5.0}
        if sentinel_password:
            sentinel_options["password"] = sentinel_password
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            service,
            db=db,
            username=unquote(username) or None,
            password=unquote(password) or None,
            **options,
        )
        return client

    return factory


def describe(error: BaseException) -> str:
    """redis-py's message, without the client repr some errors append, on one line."""
    text = " ".join(str(error).split())
    if " : <redis." in text:  # "No master found for 'mymaster' : <redis.client.Redis(...)>"
        text = text.split(" : <redis.", 1)[0]
    return text if len(text) <= 300 else text[:297] + "..."


# Replies that say "not now" and ran nothing: a script running past busy-reply-threshold
# (or one frozen mid-run), a replica cut off from its master, a cluster slot on the move.
TRANSIENT_REPLIES = ("BUSY ", "MASTERDOWN ", "TRYAGAIN ")


def _retryable(error: Exception) -> bool:
    if isinstance(error, ResponseError):
        return str(error).startswith(TRANSIENT_REPLIES)
    return not isinstance(error, AuthenticationError)


class RedisLink:
    """Runs operations against Redis: a connection error or a transient reply (BUSY, LOADING,
    MASTERDOWN, TRYAGAIN) is logged once (one warning line per outage), retried with
    exponential backoff for up to `reconnect_s`, then raised as BrokerError; any other reply
    error becomes BrokerError at once."""

    def __init__(self, url: str, reconnect_s: float) -> None:
        self.url = url
        self.reconnect_s = reconnect_s
        backoff = ExponentialBackoff(cap=1.0, base=0.02)
        waited, retries = 0.0, 0
        while waited < reconnect_s:
            retries += 1
            waited += backoff.compute(retries)
        self._retry = Retry(
            backoff, retries, (ConnectionError, TimeoutError, OSError, ResponseError)
        )
        self._lock = threading.Lock()
        self.down = False
        self._restored_at = -SAME_OUTAGE_S

    def call(self, operation: Callable[[], T]) -> T:
        try:
            result = self._retry.call_with_retry(operation, self.lost, _retryable)
        except (ConnectionError, TimeoutError, OSError, ResponseError) as exc:
            gave_up = f"gave up after {self.reconnect_s:g} s of reconnecting"
            raise self.failure(exc, gave_up) from None
        if self.down:
            self.restored()
        return result

    def failure(self, exc: Exception, gave_up: str = "") -> BrokerError:
        """The one clear error for a failed call: refused credentials, unreachable (`gave_up`
        says after how much retrying), or an error reply."""
        if isinstance(exc, AuthenticationError):
            return BrokerError(f"redis at {self.url} refused the credentials: {describe(exc)}")
        if isinstance(exc, ResponseError):
            return self.error(exc)
        if gave_up:
            return BrokerError(f"redis at {self.url} is unreachable ({describe(exc)}); {gave_up}")
        return BrokerError(f"redis at {self.url} is unreachable: {describe(exc)}")

    def lost(self, error: Exception) -> None:
        with self._lock:
            if self.down:
                return
            self.down = True
            echo = time.monotonic() - self._restored_at < SAME_OUTAGE_S
        if echo:
            logger.debug("a connection opened before the outage failed (%s); reconnecting", error)
            return
        if isinstance(error, ResponseError):  # a transient reply: the connection is fine
            logger.warning(
                "redis at %s cannot serve calls now (%s); retrying with backoff for up to %g s",
                self.url,
                describe(error),
                self.reconnect_s,
            )
            return
        logger.warning("lost the connection to redis at %s (%s); reconnecting with backoff "
                       "for up to %g s", self.url, describe(error), self.reconnect_s)  # fmt: skip

    def restored(self) -> None:
        with self._lock:
            if not self.down:
                return
            self.down = False
            echo = time.monotonic() - self._restored_at < SAME_OUTAGE_S
            self._restored_at = time.monotonic()
        if echo:
            return
        logger.info("reconnected to redis at %s", self.url)

    def error(self, exc: ResponseError) -> BrokerError:
        text = describe(exc)
        if text.startswith("NOPERM") or "no permissions" in text:
            return BrokerError(f"redis at {self.url} denied an operation to this user: {text}")
        return BrokerError(f"redis at {self.url}: {text}")
