"""The signature: HMAC-SHA256 over a canonical encoding of the envelope. Canonical means the
same bytes whatever the key order, whichever default fields were written out, and whether the
envelope was built in Python or read back from the broker; every field but `signature` and
`attempt` is covered, `id` and `created_at` included (no replay as a new job)."""

from __future__ import annotations

import hashlib
import hmac
import json

import msgspec
import pytest

from backroom.envelope import Envelope, decode
from backroom.errors import BadEnvelope

KEY = b"api-key-2026"
OTHER = b"scheduler-key-2026"


def envelope(**fields: object) -> Envelope:
    base: dict[str, object] = {
        "id": "0000000000001aaaaaaaaaa", "job": "add", "source": "api",
        "payload": {"b": 2, "a": {"z": 1, "y": [3, {"d": 1, "c": 2}]}},
        "tags": ("edge-1",), "created_at": 1_790_000_000.25,
    }  # fmt: skip
    base.update(fields)
    return Envelope(**base)  # type: ignore[arg-type]


def test_signing_bytes_are_sorted_compact_json_without_signature_and_attempt() -> None:
    signed = envelope(attempt=4).signed(KEY)
    body = signed.signing_bytes()
    assert body == (
        b'{"created_at":1790000000.25,"id":"0000000000001aaaaaaaaaa","job":"add",'
        b'"payload":{"a":{"y":[3,{"c":2,"d":1}],"z":1},"b":2},"source":"api","tags":["edge-1"]}'
    )
    assert json.loads(body) == json.loads(msgspec.json.encode(json.loads(body)))
    assert signed.signature == hmac.new(KEY, body, hashlib.sha256).hexdigest()


def test_the_same_envelope_signs_the_same_however_its_json_is_written() -> None:
    reference = envelope().signed(KEY)
    shuffled = {
        "tags": ["edge-1"], "source": "api", "created_at": 1790000000.25,
        "payload": {"a": {"y": [3, {"c": 2, "d": 1}], "z": 1}, "b": 2},
        "job": "add", "id": "0000000000001aaaaaaaaaa", "signature": reference.signature,
        # defaults written out, an attempt count the broker set: none of it changes the bytes
        "queue": "default", "priority": 0, "max_retries": 3, "attempt": 7, "timeout": None,
    }  # fmt: skip
    read_back = decode(json.dumps(shuffled).encode())
    assert read_back.signing_bytes() == reference.signing_bytes()
    assert read_back.signature_valid([KEY])


def test_an_int_where_the_wire_has_a_float_signs_as_the_worker_reads_it() -> None:
    # App(timeout=60) builds the envelope with the int 60; the worker decodes 60.0. Both must
    # sign the same bytes, or every job with an int timeout is rejected once keys are set.
    produced = envelope(timeout=60, eta=1_790_000_100, unique_key="k", unique_for=30).signed(KEY)
    consumed = decode(produced.encode())
    assert consumed.timeout == 60.0 and isinstance(consumed.timeout, float)
    assert consumed.signing_bytes() == produced.signing_bytes()
    assert consumed.signature_valid([KEY])


def test_round_trips_through_the_broker_keep_the_signature_valid() -> None:
    signed = envelope(priority=-5, max_retries=0, expires=1.5e9, then="double").signed(KEY)
    for _ in range(3):
        signed = decode(signed.encode()).with_attempt(signed.attempt + 1)
        assert signed.signature_valid([KEY])


@pytest.mark.parametrize(
    "change",
    [
        {"id": "0000000000001bbbbbbbbbb"},  # replayed as a new job
        {"created_at": 1_790_000_001.25},  # replayed as a new job
        {"source": "scheduler"},
        {"job": "send_invoices"},
        {"payload": {"b": 3, "a": {"z": 1, "y": [3, {"d": 1, "c": 2}]}}},
        {"tags": ("edge-1", "vip")},
        {"queue": "high"},
        {"priority": 10},
        {"max_retries": 100},
        {"timeout": 1.0},
        {"eta": 1.0},
        {"expires": 1.0},
        {"unique_key": "k"},
        {"then": "double"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changing_any_signed_field_breaks_the_signature(change: dict[str, object]) -> None:
    signed = envelope().signed(KEY)
    tampered = msgspec.structs.replace(signed, **change)
    assert not tampered.signature_valid([KEY])
    assert not decode(tampered.encode()).signature_valid([KEY])


def test_attempt_is_not_signed_because_the_broker_rewrites_it_on_every_claim() -> None:
    signed = envelope().signed(KEY)
    assert signed.with_attempt(3).signature_valid([KEY])


def test_a_signature_is_valid_only_under_the_key_that_made_it() -> None:
    signed = envelope().signed(KEY)
    assert signed.signature_valid([KEY]) and signed.signature_valid([OTHER, KEY])
    assert not signed.signature_valid([OTHER]) and not signed.signature_valid([])
    assert not envelope().signature_valid([KEY])  # unsigned


@pytest.mark.parametrize(
    "signature",
    ["", "00", "zz" * 32, "é" * 64, "\ud800" * 64, "0" * 63, "0" * 65, "a" * 10_000],
    ids=["empty", "short", "not-hex", "non-ascii", "surrogates", "63", "65", "huge"],
)
def test_a_malformed_signature_is_invalid_and_never_raises(signature: str) -> None:
    assert envelope(signature=signature).signature_valid([KEY]) is False


def test_an_uppercase_hex_signature_from_another_language_is_accepted() -> None:
    signed = envelope().signed(KEY)
    assert signed.signature is not None
    upper = msgspec.structs.replace(signed, signature=signed.signature.upper())
    assert upper.signature_valid([KEY])


def test_an_envelope_that_cannot_travel_cannot_be_signed_and_is_never_valid() -> None:
    deep: object = 0
    for _ in range(200):
        deep = [deep]
    too_deep = envelope(payload={"x": deep})
    with pytest.raises(BadEnvelope, match="nested more than"):
        too_deep.signed(KEY)
    forged = msgspec.structs.replace(too_deep, signature="0" * 64)
    assert forged.signature_valid([KEY]) is False
    with pytest.raises(BadEnvelope):
        envelope(priority=2**70).signed(KEY)
