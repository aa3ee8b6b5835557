"""Key configuration: App(keys=...), $BACKROOM_KEYS and $BACKROOM_KEYS_FILE. Malformed values
raise ConfigError with a message that says what to write and never quotes a key; a keyring's
repr never shows a key either."""

from __future__ import annotations

from pathlib import Path

import pytest
from msgspec.structs import replace

import backroom
from backroom.errors import ConfigError
from backroom.security import BadSignature, Keyring
from tests.security.secure_app import build_app


def test_the_environment_format_lists_sources_with_their_keys_newest_first() -> None:
    ring = Keyring.parse(" api = k1 , k0 ;scheduler=k2;\n# a comment line\njob:*=k3;")
    assert dict(ring) == {"api": [b"k1", b"k0"], "scheduler": [b"k2"], "job:*": [b"k3"]}


def test_base64_keys_keep_their_padding() -> None:
    assert Keyring.parse("api=c2VjcmV0IGtleQ==")["api"] == [b"c2VjcmV0IGtleQ=="]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api", "entry #1 has no '='; write SOURCE=KEY"),
        ("api=k1;justakey-s3cr3t", "entry #2 has no '='"),
        ("=s3cr3t", "entry #1: a source name must be non-empty"),
        ("my api=s3cr3t", "entry #1: a source name must be non-empty, without spaces"),
        ("api=", "source 'api' has no key after '='"),
        ("api= , ", "source 'api' has no key after '='"),
        ("api=s3cr3t,,older", "source 'api' has an empty key"),
        ("api=s3cr3t;api=other", "source 'api' is listed twice"),
        ("j*b=s3cr3t", "'*' may only end a source name"),
    ],
)
def test_malformed_key_settings_raise_config_error_without_quoting_a_key(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKROOM_KEYS", text)
    with pytest.raises(ConfigError, match=message) as caught:
        backroom.App("memory://")
    assert str(caught.value).startswith("BACKROOM_KEYS: ")
    assert "s3cr3t" not in str(caught.value) and "justakey" not in str(caught.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"api": []}, "source 'api' needs at least one key"),
        ({"api": ["k1", ""]}, "key #2 of source 'api' is empty"),
        ({"api": [1]}, "key #1 of source 'api' must be a string or bytes, got int"),
        ({"api": {"k1"}}, "source 'api' needs a key or a list of keys"),
        ({"": "k1"}, "source #1: a source name must be non-empty"),
    ],
)
def test_malformed_app_keys_raise_config_error(keys: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        backroom.App("memory://", keys=keys)  # type: ignore[arg-type]


def test_app_keys_take_strings_bytes_or_lists_and_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKROOM_KEYS", "api=from-env")
    assert backroom.App("memory://").keys["api"] == [b"from-env"]
    app = backroom.App("memory://", keys={"api": "new", "scheduler": [b"s2", "s1"]})
    assert dict(app.keys) == {"api": [b"new"], "scheduler": [b"s2", b"s1"]}
    assert not backroom.App("memory://", keys={}).keys  # explicitly none: env ignored


def test_keys_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "keys"
    secret.write_text("# rotated 2026-11-01\napi=new,old\nscheduler=s1\n")
    monkeypatch.setenv("BACKROOM_KEYS_FILE", str(secret))
    assert dict(backroom.App("memory://").keys) == {"api": [b"new", b"old"], "scheduler": [b"s1"]}
    monkeypatch.setenv("BACKROOM_KEYS", "api=x")
    with pytest.raises(ConfigError, match="set BACKROOM_KEYS or BACKROOM_KEYS_FILE, not both"):
        backroom.App("memory://")
    monkeypatch.delenv("BACKROOM_KEYS")
    monkeypatch.setenv("BACKROOM_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"BACKROOM_KEYS_FILE .* cannot be read"):
        backroom.App("memory://")


def test_a_keyring_repr_names_sources_but_never_shows_a_key() -> None:
    app = backroom.App("memory://", keys={"api": ["topsecret-1", "topsecret-0"]})
    for text in (repr(app.keys), str(app.keys), repr(app)):
        assert "topsecret" not in text
    assert repr(app.keys) == "Keyring({api: 2 key(s)})"


def test_a_prefix_pattern_covers_job_sources_and_an_exact_name_wins() -> None:
    ring = Keyring({"job:*": "jobs", "job:fan_out": "exact", "job:billing:*": "billing"})
    assert ring["job:fan_out"] == [b"exact"]
    assert ring["job:add"] == [b"jobs"]
    assert ring["job:billing:run"] == [b"billing"]  # the longer pattern wins
    assert ring.get("api") is None and "api" not in ring and "job:x" in ring


def test_the_producer_signs_with_the_newest_key_of_its_source() -> None:
    app = build_app("memory://", keys={"api": ["newest", "older"]})
    envelope = app.envelope("add", {"a": 1})
    assert envelope.signature_valid([b"newest"]) and not envelope.signature_valid([b"older"])


def test_a_producer_without_a_key_for_its_source_fails_at_enqueue() -> None:
    app = build_app("memory://", keys={"scheduler": ["s1"]})
    with pytest.raises(ConfigError, match="no signing key for source 'api' in this process"):
        app.enqueue("add", {"a": 1})
    assert app.broker.stats().queues.get("default", 0) == 0


def test_without_keys_nothing_is_signed_and_everything_verifies() -> None:
    app = build_app("memory://")
    envelope = app.envelope("add", {"a": 1})
    assert envelope.signature is None
    app.keys.verify(envelope)  # trusted as declared


def test_verify_names_what_is_wrong() -> None:
    ring = Keyring({"api": "a-key", "scheduler": "s-key"})
    app = build_app("memory://", keys={"api": "a-key"})
    signed = app.envelope("add", {"a": 1})
    ring.verify(signed)
    with pytest.raises(BadSignature, match="envelope from 'api' is not signed"):
        ring.verify(replace(signed, signature=None))
    with pytest.raises(BadSignature, match="no key is configured for source 'job:x'"):
        ring.verify(replace(signed, source="job:x"))
    with pytest.raises(BadSignature, match="does not match a key of source 'scheduler'"):
        ring.verify(replace(signed, source="scheduler"))


@pytest.mark.parametrize("limit", [0, -1, 1.5, "1MiB", True])
def test_a_bad_payload_limit_is_a_config_error(limit: object) -> None:
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        backroom.App("memory://", max_payload_bytes=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [("(unclosed", "not a valid regular expression"), ("  ", "is empty"), ([], "field names")],
)
def test_a_bad_secret_field_pattern_is_a_config_error(fields: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        backroom.App("memory://", secret_fields=fields)  # type: ignore[arg-type]


def test_a_bad_secret_field_pattern_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKROOM_SECRET_FIELDS", "[")
    with pytest.raises(ConfigError, match="BACKROOM_SECRET_FIELDS: not a valid regular"):
        backroom.App("memory://")
