"""The envelope: what travels through the queue (job name, source, payload, tags and delivery
settings), its JSON encoding and its signature. JSON only; never pickle."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from enum import StrEnum
from typing import Any

import msgspec

from backroom.errors import BadEnvelope

JSON = Any  # a value that msgspec.json can encode: dict, list, str, int, float, bool, None


class State(StrEnum):
    """Where a job is in its lifecycle. Prints and serializes as its value ("queued")."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD = "dead"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


FINAL_STATES = frozenset({State.SUCCEEDED, State.DEAD, State.CANCELLED, State.REJECTED})


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """One job on the wire. Timestamps are Unix seconds (float). Fields left at their default are
    not written, which keeps a queued no-op job small."""

    id: str
    job: str
    source: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    queue: str = "default"
    priority: int = 0
    attempt: int = 0
    max_retries: int = 3
    timeout: float | None = None
    eta: float | None = None
    expires: float | None = None
    unique_key: str | None = None
    unique_for: str | float | None = None  # "start", "finish" or seconds; None means "finish"
    then: str | None = None
    created_at: float = 0.0
    signature: str | None = None

    def encode(self) -> bytes:
        return _encoder.encode(self)

    def with_attempt(self, attempt: int) -> Envelope:
        return msgspec.structs.replace(self, attempt=attempt)

    # -- signatures: HMAC-SHA256 over every field but the signature itself --------------------
    def signing_bytes(self) -> bytes:
        unsigned = msgspec.structs.replace(self, signature=None, attempt=0)
        return msgspec.json.encode(msgspec.to_builtins(unsigned), order="sorted")

    def signed(self, key: bytes) -> Envelope:
        digest = hmac.new(key, self.signing_bytes(), hashlib.sha256).hexdigest()
        return msgspec.structs.replace(self, signature=digest)

    def signature_valid(self, keys: list[bytes]) -> bool:
        if not self.signature:
            return False
        body = self.signing_bytes()
        return any(
            hmac.compare_digest(hmac.new(k, body, hashlib.sha256).hexdigest(), self.signature)
            for k in keys
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def decode(data: bytes | str) -> Envelope:
    """Bytes from the broker -> Envelope; anything malformed raises BadEnvelope naming the fault."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadEnvelope(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"not valid JSON ({exc})") from None


def encode_json(value: JSON) -> bytes:
    """Encode a result or any JSON value; raises TypeError naming what is not JSON."""
    try:
        return _encoder.encode(value)
    except TypeError as exc:
        raise TypeError(f"not JSON-serializable: {exc}") from None


def decode_json(data: bytes | str | None) -> JSON:
    return None if data is None else msgspec.json.decode(data)


def new_id() -> str:
    """A 23-character id that sorts by creation time (microseconds, then 40 random bits)."""
    return f"{time.time_ns() // 1000:013x}{int.from_bytes(os.urandom(5), 'big'):010x}"
