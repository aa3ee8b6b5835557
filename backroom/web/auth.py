"""Who may call the dashboard's HTTP API: bearer tokens mapped to sources, a Host allow-list
against DNS rebinding, and a same-origin check that keeps other web sites from changing state.
A token never appears in an error message, a log line or a URL."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from backroom.errors import ConfigError

ENV_TOKEN = "BACKROOM_DASHBOARD_TOKEN"
ENV_TOKENS = "BACKROOM_DASHBOARD_TOKENS"
SINGLE_TOKEN_SOURCE = "dashboard"  # the source $BACKROOM_DASHBOARD_TOKEN enqueues as
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

TokenSpec = Mapping[str, str | Sequence[str]]


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens and the source each one enqueues as. Empty: no authentication at all."""

    by_token: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_token)

    def source_for(self, presented: str) -> str | None:
        """The source of a presented token, or None. Compares against every token in constant
        time, so timing reveals neither which token nor how much of it matched."""
        found = None
        given = presented.encode()
        for token, source in self.by_token.items():
            if hmac.compare_digest(token.encode(), given):
                found = source
        return found

    @property
    def sources(self) -> list[str]:
        return sorted(set(self.by_token.values()))


def parse_tokens(text: str, origin: str = ENV_TOKENS) -> dict[str, list[str]]:
    """`"api=tok1,web=tok2,api=tok3"` -> {"api": ["tok1", "tok3"], "web": ["tok2"]}: a source
    may hold several tokens (rotation). Errors name the entry by position, never the token."""
    tokens: dict[str, list[str]] = {}
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            continue
        source, sep, token = entry.partition("=")
        if not sep or not source.strip() or not token.strip():
            raise ConfigError(
                f"{origin}: entry {position} is not SOURCE=TOKEN; "
                "write e.g. BACKROOM_DASHBOARD_TOKENS='api=tok1,web=tok2'"
            )
        tokens.setdefault(source.strip(), []).append(token.strip())
    return tokens


def tokens_from_env(environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Tokens from $BACKROOM_DASHBOARD_TOKEN (source "dashboard") and
    $BACKROOM_DASHBOARD_TOKENS ("source=token,..."); both may be set."""
    env = os.environ if environ is None else environ
    tokens = parse_tokens(env.get(ENV_TOKENS, ""))
    single = env.get(ENV_TOKEN, "").strip()
    if single:
        tokens.setdefault(SINGLE_TOKEN_SOURCE, []).append(single)
    return tokens


def build_tokens(spec: TokenSpec) -> Tokens:
    """Check a source -> token(s) mapping and invert it. One token for two sources is refused:
    it could not say which source a request speaks for."""
    by_token: dict[str, str] = {}
    for source, value in spec.items():
        if not isinstance(source, str) or not source:
            raise ConfigError(f"dashboard tokens: source names must be non-empty, got {source!r}")
        for token in [value] if isinstance(value, str) else list(value):
            if not isinstance(token, str) or not token.strip():
                raise ConfigError(f"dashboard tokens: source {source!r} has an empty token")
            if token in by_token and by_token[token] != source:
                raise ConfigError(
                    f"dashboard tokens: sources {by_token[token]!r} and {source!r} share a "
                    "token; give each source its own"
                )
            by_token[token] = source
    return Tokens(by_token)


def route_path(scope: Scope) -> str:
    """The path inside this app, also when it is mounted under a prefix."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _split_host(host_header: str) -> tuple[str, str]:
    """ "example.com:8787" -> ("example.com", "8787"); "[::1]:80" -> ("::1", "80"); no port: ""."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""  # a bare name, or a bare IPv6 address


def _host_name(host_header: str) -> str:
    return _split_host(host_header)[0]


DEFAULT_PORTS = {"http": "80", "https": "443"}


def same_origin(origin: str, host_header: str, scheme: str) -> bool:
    """True when an Origin header names the very scheme, host and port the request went to."""
    parts = urlsplit(origin.strip())
    try:
        origin_port = str(parts.port) if parts.port else DEFAULT_PORTS.get(parts.scheme, "")
    except ValueError:
        return False
    if not parts.scheme or not parts.hostname:
        return False  # "null" (sandboxed frames, file://) and garbage are never same-origin
    name, port = _split_host(host_header)
    return (
        parts.scheme.lower() == scheme.lower()
        and parts.hostname.lower() == name
        and origin_port == (port or DEFAULT_PORTS.get(scheme, ""))
    )


class Guard:
    """ASGI middleware in front of the whole dashboard app.

    - Host allow-list (when given): a request for another Host (DNS rebinding) gets 400.
    - With tokens: every /api and /metrics request needs `Authorization: Bearer <token>`
      (401 otherwise); the token's source is put in `scope["state"]["source"]`.
    - Without tokens: the source is the App's own.
    - CSRF: a state-changing request (POST ...) that is not authenticated by a bearer token
      must come from this origin: an Origin header, when the browser sends one, must match the
      Host, and Sec-Fetch-Site, when sent, must be same-origin. Programs that send neither
      (curl, httpx) are not browsers and cannot be driven by another site."""

    def __init__(
        self,
        inner: ASGIApp,
        tokens: Tokens,
        default_source: str,
        allowed_hosts: Sequence[str] | None = None,
    ) -> None:
        self.inner, self.tokens, self.default_source = inner, tokens, default_source
        self.allowed_hosts = (
            None if allowed_hosts is None else {_host_name(h) for h in allowed_hosts}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_name(host) not in self.allowed_hosts:
            await _deny(
                send,
                400,
                "bad_host",
                f"this dashboard does not answer for host "
                f"{host[:100]!r}; open it as http://127.0.0.1:PORT/",
            )
            return
        path = route_path(scope)
        protected = path == "/api" or path.startswith("/api/") or path == "/metrics"
        source = self.default_source
        authenticated = False
        if self.tokens and protected:
            scheme, _, presented = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                await _deny(
                    send,
                    401,
                    "unauthorized",
                    "this API needs a token: send Authorization: Bearer <token>",
                )
                return
            found = self.tokens.source_for(presented.strip())
            if found is None:
                await _deny(send, 401, "unauthorized", "the bearer token is not recognised")
                return
            source, authenticated = found, True
        if scope["method"] not in SAFE_METHODS and not authenticated:
            problem = _cross_site(headers, host, scope.get("scheme", "http"))
            if problem:
                await _deny(send, 403, "cross_site_request", problem)
                return
        scope.setdefault("state", {})["source"] = source
        await self.inner(scope, receive, send)


def _cross_site(headers: Headers, host: str, scheme: str) -> str | None:
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
        return f"refused a {fetch_site} request: state changes must come from this dashboard"
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, host, scheme):
        return (
            f"refused a request from origin {origin[:100]!r}: state changes must come from "
            "this dashboard's own origin"
        )
    return None


async def _deny(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="backroom"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
