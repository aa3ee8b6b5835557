"""connect(url) -> Broker: picks the backend by URL scheme and imports its module lazily, so a
user of SQLite never needs redis-py importable."""

from __future__ import annotations

from urllib.parse import urlsplit

from backroom.brokers.base import (
    Broker,
    Claim,
    Failure,
    FailureGroup,
    JobQuery,
    JobRecord,
    Stats,
    TagStats,
    TimelinePoint,
    WorkerInfo,
)
from backroom.errors import ConfigError

__all__ = [
    "Broker",
    "Claim",
    "Failure",
    "FailureGroup",
    "JobQuery",
    "JobRecord",
    "Stats",
    "TagStats",
    "TimelinePoint",
    "WorkerInfo",
    "connect",
]

URL_HELP = (
    "use sqlite:///FILE, redis://HOST:PORT/DB, rediss://..., "
    "redis+sentinel://HOST:PORT/SERVICE or memory://"
)


def connect(url: str) -> Broker:
    """Open the broker named by `url`. Raises ConfigError for a URL that names no broker."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme == "sqlite":
        from backroom.brokers.sqlite import SQLiteBroker

        return SQLiteBroker.from_url(url)
    if scheme == "memory":
        from backroom.brokers.sqlite import SQLiteBroker

        return SQLiteBroker(":memory:", url=url)
    if scheme in ("redis", "rediss", "redis+sentinel", "unix"):
        from backroom.brokers.redis import RedisBroker

        return RedisBroker.from_url(url)
    raise ConfigError(f"broker URL {url!r} is not a broker URL; {URL_HELP}")
