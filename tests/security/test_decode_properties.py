"""Property tests for what reads untrusted bytes: envelope.decode gets random bytes, random
JSON, envelope-shaped JSON with a random value in every field, huge numbers, deep nesting,
truncations and bit flips. It always returns an Envelope or raises BadEnvelope, never anything
else, and fast; a decoded envelope always re-encodes, signs and redacts without error; a flipped
byte never yields a valid signature over different content. The key parser and the redactor get
the same treatment. Derandomized, no example database: the same examples on every run."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backroom.envelope import Envelope, decode
from backroom.errors import BadEnvelope, ConfigError
from backroom.security import REDACTED, Keyring, Redactor

KEY = b"property-key"
FIELDS = [f.name for f in msgspec.structs.fields(Envelope)]
VALID = {"id": "0000000000001aaaaaaaaaa", "job": "add", "source": "api",
         "payload": {"a": 1, "password": "pw-123456"}, "created_at": 1_790_000_000.5}  # fmt: skip
SIGNED = decode(json.dumps(VALID)).signed(KEY)
SIGNED_BYTES = SIGNED.encode()

deterministic = settings(
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,  # hangs are caught by decodes_cleanly's own bound, generous for loaded CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

huge_ints = st.integers(min_value=-(10**40), max_value=10**40) | st.sampled_from(
    [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**400]
)
scalars = (
    st.none()
    | st.booleans()
    | huge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
number_literals = st.from_regex(r"\A-?[0-9]{1,450}(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,5})?\Z")


def decodes_cleanly(data: bytes | str) -> Envelope | None:
    """The property every input must satisfy; returns the envelope when there is one."""
    started = time.monotonic()
    try:
        envelope = decode(data)
    except BadEnvelope as exc:
        assert str(exc).startswith("malformed envelope: ")
        envelope = None
    assert time.monotonic() - started < 2.0, "decode took seconds: a hang in the making"
    if envelope is not None:
        assert decode(envelope.encode()) == envelope  # whatever decodes, re-encodes the same
        signed = envelope.signed(KEY)  # ... and can be signed and checked
        assert decode(signed.encode()).signature_valid([KEY])
        assert not envelope.signature_valid([KEY]) or envelope.signature == signed.signature
        assert isinstance(Redactor().redact(envelope.payload), dict)
    return envelope


@deterministic
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    decodes_cleanly(data)


@deterministic
@given(st.text(max_size=500) | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)))
def test_random_text_including_lone_surrogates(text: str) -> None:
    decodes_cleanly(text)


@deterministic
@given(json_values)
def test_random_json(value: Any) -> None:
    decodes_cleanly(json.dumps(value))


@deterministic
@given(st.sampled_from([*FIELDS, "config", "extra"]), json_values, st.booleans())
def test_a_random_value_in_any_field(field: str, value: Any, drop: bool) -> None:
    document = dict(VALID)
    if drop and field in document:
        del document[field]
    else:
        document[field] = value
    envelope = decodes_cleanly(json.dumps(document))
    if envelope is not None and field in ("config", "extra"):
        assert envelope == decode(json.dumps(VALID))  # unknown fields are ignored, never used


@deterministic
@given(st.sampled_from([*FIELDS, "payload.a"]), number_literals)
def test_huge_and_precise_numbers_in_any_field(field: str, literal: str) -> None:
    document = json.dumps({**VALID, "payload": {"a": "NUMBER"}} if field == "payload.a" else VALID)
    if field == "payload.a":
        document = document.replace('"NUMBER"', literal)
    else:
        document = document[:-1] + f', "{field}": {literal}}}'
    decodes_cleanly(document)


@deterministic
@given(st.integers(min_value=1, max_value=100_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_anywhere(depth: int, opener: str) -> None:
    leaf, closer = ("", "]") if opener == "[" else ("1", "}")
    nested = opener * depth + leaf + closer * depth
    decodes_cleanly(nested)
    envelope = decodes_cleanly('{"id":"a","job":"j","source":"s","payload":{"x":' + nested + "}}")
    assert (envelope is None) == (depth >= 100)  # the payload object is level 1


def test_every_truncation_of_a_signed_envelope_is_rejected() -> None:
    for cut in range(len(SIGNED_BYTES)):
        assert decodes_cleanly(SIGNED_BYTES[:cut]) is None, cut


@deterministic
@given(st.integers(min_value=0, max_value=len(SIGNED_BYTES) - 1), st.integers(0, 255))
def test_a_changed_byte_never_passes_as_a_valid_signature_over_other_content(
    position: int, value: int
) -> None:
    tampered = bytearray(SIGNED_BYTES)
    tampered[position] = value
    envelope = decodes_cleanly(bytes(tampered))
    if envelope is not None and envelope.signature_valid([KEY]):
        assert envelope.signing_bytes() == SIGNED.signing_bytes()


@deterministic
@given(st.text(max_size=200))
def test_the_key_parser_returns_a_keyring_or_a_config_error(text: str) -> None:
    try:
        ring = Keyring.parse(text)
    except ConfigError as exc:
        assert str(exc).startswith("BACKROOM_KEYS: ")
        return
    for source in ring:
        assert ring[source] and all(ring[source])


@deterministic
@given(json_values)
def test_redaction_never_fails_and_never_leaves_a_secret_field(payload: Any) -> None:
    shown = Redactor().redact({"password": payload, "data": payload, "list": [payload]})
    assert shown["password"] == REDACTED
    json.dumps(shown)


secret_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=4, max_size=60)


@deterministic
@given(secret_text, st.text(max_size=60), st.text(max_size=60), st.integers(0, 80), json_values)
def test_scrubbing_removes_a_secret_from_any_text_even_cut_short(
    secret: str, before: str, after: str, keep: int, noise: Any
) -> None:
    redactor = Redactor()
    shown = secret if len(secret) <= 8 else secret[: max(8, keep)]  # as a message may cut it
    scrubbed = redactor.scrub(before + shown + after, {"api_key": secret, "other": noise})
    assert scrubbed is not None and shown not in scrubbed
    assert isinstance(redactor.scrub(before + after, {"token": noise}), str | None)
