"""Shared test helpers: free ports, polling to a deadline, envelopes with sensible defaults.
Nothing here sleeps and hopes: waits poll a predicate and fail loudly at a deadline."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from backroom.envelope import Envelope

_id_lock = threading.Lock()
_last_micros = 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], object], deadline_s: float, what: str) -> None:
    """Poll `predicate` until it returns something truthy; fail naming `what` after deadline_s."""
    deadline = time.monotonic() + deadline_s
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(delay)  # a polling interval, not a bet: the predicate decides
        delay = min(delay * 2, 0.1)


def redis_answers(url: str) -> bool:
    """True once a Redis server at redis://HOST:PORT/... answers PING."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def next_id() -> str:
    """An id shaped like envelope.new_id() but strictly increasing within this process, so
    "newest first" and "oldest first" have one right answer even inside one microsecond."""
    global _last_micros
    with _id_lock:
        _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
        micros = _last_micros
    return f"{micros:013x}{int.from_bytes(os.urandom(5), 'big'):010x}"


_sequence = itertools.count()


def envelope_for(job: str, **fields: Any) -> Envelope:
    """An envelope for `job` from source "api" on queue "default"; override any field."""
    fields.setdefault("id", next_id())
    fields.setdefault("source", "api")
    fields.setdefault("created_at", time.time())
    fields.setdefault("payload", {"n": next(_sequence)})
    return Envelope(job=job, **fields)
