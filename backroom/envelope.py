"""The envelope: what travels through the queue (job name, source, payload, tags and delivery
settings), its JSON encoding and its signature. JSON only; never pickle."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from enum import StrEnum
from typing import Annotated, Any

import msgspec

from backroom.errors import BadEnvelope

JSON = Any  # a value that msgspec.json can encode: dict, list, str, int, float, bool, None

# Bounds a decoded envelope must respect, so bytes from elsewhere can't smuggle in values that
# break later steps: integers SQLite can't store, payloads nested deep enough to exhaust the
# stack of whatever walks them next (validation, redaction, encoding).
MAX_NESTING = 100
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, msgspec.Meta(min_length=1)]
UniqueMode = Annotated[str, msgspec.Meta(pattern="^(start|finish)$")]


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

    id: Name
    job: Name
    source: Name
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    queue: Name = "default"
    priority: Int64 = 0
    attempt: Count = 0
    max_retries: Int64 = 3
    timeout: float | None = None
    eta: float | None = None
    expires: float | None = None
    unique_key: str | None = None
    unique_for: UniqueMode | float | None = None  # "start", "finish" or seconds; None: "finish"
    then: str | None = None
    created_at: float = 0.0
    signature: str | None = None

    def encode(self) -> bytes:
        return _encoder.encode(self)

    def with_attempt(self, attempt: int) -> Envelope:
        return msgspec.structs.replace(self, attempt=attempt)

    # -- signatures -------------------------------------------------------------------------------
    # HMAC-SHA256 over a canonical encoding of every field but `signature` and `attempt`: compact
    # JSON, keys sorted at every level, fields equal to their default left out (so a field added
    # later leaves old signatures valid), each value as it reads back from the wire (a timeout of
    # 60 signs as 60.0, as a worker decodes it). `attempt` is the
    # broker's count of runs, rewritten on every claim by a party that holds no key; `id` and
    # `created_at` are signed, so a captured envelope can't be replayed as a new job.
    def signing_bytes(self) -> bytes:
        """The bytes a signature covers. Raises BadEnvelope when a field can't travel (a value
        out of bounds, a payload nested too deeply)."""
        canonical = decode(msgspec.structs.replace(self, signature=None, attempt=0).encode())
        fields = {
            name: getattr(canonical, name)
            for name, default in _SIGNED_DEFAULTS.items()
            if getattr(canonical, name) != default
        }
        return msgspec.json.encode(msgspec.to_builtins(fields), order="sorted")

    def signed(self, key: bytes) -> Envelope:
        """This envelope with `signature` set: lowercase hex HMAC-SHA256 under `key`."""
        digest = hmac.new(key, self.signing_bytes(), hashlib.sha256).hexdigest()
        return msgspec.structs.replace(self, signature=digest)

    def signature_valid(self, keys: list[bytes]) -> bool:
        """True when `signature` is the HMAC of this envelope under one of `keys`. Never raises:
        a signature that is not 64 hex digits, or an envelope that can't be encoded, is invalid."""
        signature = (self.signature or "").lower()
        if len(signature) != 64 or not signature.isascii():
            return False
        try:
            body = self.signing_bytes()
        except (BadEnvelope, TypeError, ValueError):
            return False
        expected = signature.encode()
        return any(
            hmac.compare_digest(hmac.new(k, body, hashlib.sha256).hexdigest().encode(), expected)
            for k in keys
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)
_SIGNED_DEFAULTS: dict[str, Any] = {  # NODEFAULT (required fields) equals no value: always in
    field.name: field.default_factory()
    if field.default is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT
    else field.default
    for field in msgspec.structs.fields(Envelope)
    if field.name not in ("signature", "attempt")
}


def decode(data: bytes | str) -> Envelope:
    """Bytes from the broker -> Envelope; anything malformed raises BadEnvelope naming the fault,
    never another exception, whatever the input: not JSON, truncated, wrong field types, values
    out of bounds, a payload nested more than MAX_NESTING levels deep."""
    try:
        envelope = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadEnvelope(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise BadEnvelope(f"nested more than {MAX_NESTING} levels deep") from None
    except UnicodeError:
        raise BadEnvelope("not valid UTF-8 text") from None
    except TypeError:
        raise BadEnvelope(f"expected JSON bytes or text, got {type(data).__name__}") from None
    if too_deep(envelope.payload):
        raise BadEnvelope(f"payload nested more than {MAX_NESTING} levels deep")
    return envelope


_CONTAINERS = (dict, list, tuple)  # a tuple: isinstance checks it faster than dict | list | tuple


def too_deep(value: JSON, limit: int = MAX_NESTING) -> bool:
    """True when objects and arrays in `value` nest more than `limit` levels deep. Iterative, so
    it is safe on any input; only containers are visited."""
    if not isinstance(value, _CONTAINERS):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, _CONTAINERS):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def encode_json(value: JSON) -> bytes:
    """Encode a result or any JSON value; raises TypeError naming what is not JSON."""
    try:
        return _encoder.encode(value)
    except TypeError as exc:
        raise TypeError(f"not JSON-serializable: {exc}") from None


def decode_json(data: bytes | str | None) -> JSON:
    return None if data is None else msgspec.json.decode(data)


_RANDOM_IDS = 1 << 40  # an id's random part: 10 hex digits


def new_id() -> str:
    """A 23-character id that sorts by creation time (microseconds, then 40 random bits)."""
    return f"{time.time_ns() // 1000:013x}{os.urandom(5).hex()}"  # hex(): 10 digits, big-endian


def new_ids(count: int) -> list[str]:
    """`count` ids as new_id makes them, from one read of the system's randomness: they share
    the microsecond, so the random part counts up from a random start. No two of a batch are
    alike (40 random bits each would clash about once in 100 batches of 150,000), and they sort
    in the batch's order."""
    start = int.from_bytes(os.urandom(5), "big") % (_RANDOM_IDS - count + 1)
    micros = f"{time.time_ns() // 1000:013x}"
    return [f"{micros}{n:010x}" for n in range(start, start + count)]
