"""Security settings an App holds: the keyring (which producer may claim which source) and the
redactor (which payload fields are secrets, masked wherever a payload is shown). Reads the
environment when asked; never logs, prints or reprs a key."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from backroom.envelope import JSON, MAX_NESTING, Envelope
from backroom.errors import CheckFailed, ConfigError

KEYS_ENV = "BACKROOM_KEYS"
KEYS_FILE_ENV = "BACKROOM_KEYS_FILE"
SECRET_FIELDS_ENV = "BACKROOM_SECRET_FIELDS"
DEFAULT_SECRET_PATTERN = (
    r"pass(word|wd|phrase)?|secret|token|api[_-]?key|auth(orization)?|credential|"
    r"private[_-]?key|cookie|session[_-]?id"
)
REDACTED = "[redacted]"
MIN_SCRUB_CHARS = 4  # shorter secret values are not hunted for in free text (too many false hits)
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")

KeyValue = str | bytes
KeySpec = Mapping[str, KeyValue | Sequence[KeyValue]]


class BadSignature(CheckFailed):
    """An envelope whose signature does not prove its source: unsigned, signed with a key its
    source does not hold, or claiming a source no key is configured for."""


class Keyring(Mapping[str, list[bytes]]):
    """Signing keys by source, newest first. An empty keyring means sources are trusted as
    declared. A name ending in `*` covers every source with that prefix (`job:*` covers the
    `job:<name>` sources of jobs enqueued by jobs); an exact name wins over a pattern, a longer
    pattern over a shorter one. Lookups (`keyring[source]`, `.get`) resolve patterns.

    Its repr names the sources and how many keys each has, never the keys."""

    def __init__(self, keys: KeySpec | None = None, *, origin: str = "keys") -> None:
        self._keys: dict[str, list[bytes]] = {}
        for position, (source, value) in enumerate((keys or {}).items(), start=1):
            if not isinstance(source, str):
                raise ConfigError(f"{origin}: source #{position} must be a string")
            name = _source_name(source, f"{origin}: source #{position}")
            values = [value] if isinstance(value, str | bytes) else value
            if not isinstance(values, Sequence):
                raise ConfigError(
                    f"{origin}: source {name!r} needs a key or a list of keys (newest first)"
                )
            if not values:
                raise ConfigError(f"{origin}: source {name!r} needs at least one key")
            self._keys[name] = [
                _key(item, f"{origin}: key #{index} of source {name!r}")
                for index, item in enumerate(values, start=1)
            ]

    @classmethod
    def parse(cls, text: str, origin: str = KEYS_ENV) -> Keyring:
        """Read `source=newest,older;other=key` (`;` or newlines between sources, `,` between
        one source's keys, `#` starts a comment line). Error messages never quote a key."""
        entries: dict[str, list[str]] = {}
        for position, raw in enumerate(re.split(r"[;\n]", text), start=1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            name, equals, keys = entry.partition("=")
            if not equals:
                raise ConfigError(
                    f"{origin}: entry #{position} has no '='; write SOURCE=KEY[,OLDER_KEY...]"
                )
            name = _source_name(name.strip(), f"{origin}: entry #{position}")
            if name in entries:
                raise ConfigError(f"{origin}: source {name!r} is listed twice")
            values = [k.strip() for k in keys.split(",")]
            if not any(values):
                raise ConfigError(f"{origin}: source {name!r} has no key after '='")
            if not all(values):
                raise ConfigError(f"{origin}: source {name!r} has an empty key (stray ',')")
            entries[name] = values
        return cls(entries, origin=origin)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        """The keyring named by `$BACKROOM_KEYS` (the keys themselves) or `$BACKROOM_KEYS_FILE`
        (a file holding the same text); empty when neither is set."""
        env = os.environ if environ is None else environ
        text, path = env.get(KEYS_ENV, ""), env.get(KEYS_FILE_ENV, "")
        if text.strip() and path:
            raise ConfigError(f"set {KEYS_ENV} or {KEYS_FILE_ENV}, not both")
        if path:
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeError) as exc:
                problem = getattr(exc, "strerror", None) or type(exc).__name__
                raise ConfigError(f"{KEYS_FILE_ENV} {path!r} cannot be read: {problem}") from None
            return cls.parse(text, origin=KEYS_FILE_ENV)
        return cls.parse(text) if text.strip() else cls()

    # -- lookups ---------------------------------------------------------------------------------
    def __getitem__(self, source: str) -> list[bytes]:
        keys = self._keys.get(source)
        if keys is not None:
            return keys
        best = ""
        for name in self._keys:
            if name.endswith("*") and source.startswith(name[:-1]) and len(name) > len(best):
                best = name
        if not best:
            raise KeyError(source)
        return self._keys[best]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        held = ", ".join(f"{name}: {len(keys)} key(s)" for name, keys in self._keys.items())
        return f"Keyring({{{held}}})"

    # -- signing ---------------------------------------------------------------------------------
    def sign(self, envelope: Envelope) -> Envelope:
        """The envelope signed with the newest key of its source; unchanged when the keyring is
        empty. Raises ConfigError when keys are configured but none covers this source: a worker
        holding keys would reject the job, so the producer hears it now."""
        if not self._keys:
            return envelope
        keys = self.get(envelope.source)
        if not keys:
            raise ConfigError(
                f"no signing key for source {envelope.source!r} in this process (keys are "
                f"configured for: {', '.join(self._keys)}); workers would reject its jobs"
            )
        return envelope.signed(keys[0])

    def verify(self, envelope: Envelope) -> None:
        """Raise BadSignature unless the envelope is signed with a key of the source it claims.
        Any key of the source passes (rotation: newest and older keys overlap). With an empty
        keyring every envelope passes: sources are trusted as declared."""
        if not self._keys:
            return
        if not envelope.signature:
            raise BadSignature(f"envelope from {envelope.source!r} is not signed")
        keys = self.get(envelope.source)
        if not keys:
            raise BadSignature(f"no key is configured for source {envelope.source!r}")
        if not envelope.signature_valid(keys):
            raise BadSignature(f"signature does not match a key of source {envelope.source!r}")


class Redactor:
    """Masks secrets wherever a payload is shown. A field is secret when its name matches the
    pattern (case-insensitive search; default: password, token, secret, api_key, auth ...): its
    whole value becomes "[redacted]". Passwords inside URLs (`scheme://user:pw@host`) are masked
    in any string. `scrub` also hunts a payload's secret values down in free text (error
    messages, tracebacks, rejection reasons)."""

    def __init__(self, fields: str | Iterable[str] | None = None) -> None:
        if fields is None:
            fields = os.environ.get(SECRET_FIELDS_ENV) or DEFAULT_SECRET_PATTERN
            origin = SECRET_FIELDS_ENV if SECRET_FIELDS_ENV in os.environ else "secret_fields"
        else:
            origin = "secret_fields"
        if not isinstance(fields, str):
            names = list(fields)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"{origin}: give a regular expression or non-empty field names")
            fields = "|".join(re.escape(n) for n in names)
        if not fields.strip():
            raise ConfigError(f"{origin}: the secret-field pattern is empty")
        try:
            self.pattern = re.compile(fields, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{origin}: not a valid regular expression ({exc})") from None

    def is_secret(self, name: object) -> bool:
        return bool(self.pattern.search(str(name)))

    def redact(self, value: JSON) -> JSON:
        """A copy of `value` with secret fields masked, at any depth (past MAX_NESTING levels
        the rest is masked too: it can't have come through a checked envelope)."""
        return self._redact(value, 0)

    def _redact(self, value: JSON, depth: int) -> JSON:
        if isinstance(value, str):
            return _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", value)
        if not isinstance(value, Mapping | list | tuple):
            return value
        if depth >= MAX_NESTING:
            return REDACTED
        if isinstance(value, Mapping):
            return {
                k: REDACTED if self.is_secret(k) else self._redact(v, depth + 1)
                for k, v in value.items()
            }
        return [self._redact(v, depth + 1) for v in value]

    def secret_values(self, payload: JSON) -> list[str]:
        """The text of every value under a secret field (at any depth), longest first."""
        found: set[str] = set()
        stack: list[tuple[Any, bool]] = [(payload, False)]
        while stack:
            item, secret = stack.pop()
            if isinstance(item, Mapping):
                stack.extend((v, secret or self.is_secret(k)) for k, v in item.items())
            elif isinstance(item, list | tuple):
                stack.extend((v, secret) for v in item)
            elif secret and item is not None and not isinstance(item, bool):
                text = str(item)
                if len(text) >= MIN_SCRUB_CHARS:
                    found.add(text)
        return sorted(found, key=len, reverse=True)

    def scrub(self, text: str | None, payload: JSON) -> str | None:
        """`text` with the payload's secret values masked, also where a message cut one short
        ("got 'abcdef..."): any run of eight or more of a secret's leading characters goes. Also
        masks URL passwords."""
        if not text:
            return text
        for secret in self.secret_values(payload):
            text = _mask(text, secret)
        return _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)

    def __repr__(self) -> str:
        return f"Redactor({self.pattern.pattern!r})"


# -- helpers ---------------------------------------------------------------------------------------


def _source_name(name: str, where: str) -> str:
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ConfigError(f"{where}: a source name must be non-empty, without spaces")
    if "*" in name[:-1]:
        raise ConfigError(f"{where}: '*' may only end a source name (a prefix, like 'job:*')")
    return name


def _key(value: object, where: str) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise ConfigError(f"{where} must be a string or bytes, got {type(value).__name__}")
    if not value:
        raise ConfigError(f"{where} is empty")
    return value


def _mask(text: str, secret: str) -> str:
    text = text.replace(secret, REDACTED)
    if len(secret) <= 8:
        return text
    head = secret[:8]
    start = text.find(head)
    while start != -1:
        end = start + 8
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        text = text[:start] + REDACTED + text[end:]
        start = text.find(head, start + len(REDACTED))
    return text
