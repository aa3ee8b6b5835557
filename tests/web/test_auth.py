"""Who may call the API: tokens map to sources (an `api` token can never enqueue as the
scheduler), no token is a 401, other web sites cannot change state (CSRF), other Host names
are refused (DNS rebinding), and a token never shows up in an error."""

from __future__ import annotations

from typing import Any

import pytest

import backroom
from backroom.errors import ConfigError
from backroom.web.auth import build_tokens, parse_tokens, same_origin, tokens_from_env
from tests.web.conftest import ClientFactory

TOKENS = {"api": "tok-api-1", "scheduler": ["tok-sched-old", "tok-sched-new"]}
READS = [
    "/api/jobs",
    "/api/jobs/x",
    "/api/stats",
    "/api/activity",
    "/api/failures",
    "/api/workers",
    "/api/schedules",
    "/api/queues",
    "/api/registry",
    "/api/whoami",
    "/api/openapi.json",
    "/metrics",
]
WRITES = [
    "/api/jobs",
    "/api/jobs/x/cancel",
    "/api/jobs/x/retry",
    "/api/bulk/retry",
    "/api/bulk/delete",
    "/api/queues/default/pause",
    "/api/queues/default/resume",
]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def invoice() -> dict[str, Any]:
    return {"job": "send_invoices", "payload": {"month": "2026-11"}}


def test_without_a_token_every_api_call_is_a_401(client_for: ClientFactory) -> None:
    client = client_for(TOKENS)
    for path in READS:
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in WRITES:
        assert client.post(path, json={}).status_code == 401, path


@pytest.mark.parametrize(
    "header",
    ["Bearer wrong", "Bearer ", "Basic dG9rLWFwaS0xOg==", "tok-api-1", "Bearer tok-api-1x"],
)
def test_a_wrong_token_is_a_401_that_never_echoes_a_token(
    client_for: ClientFactory, header: str
) -> None:
    response = client_for(TOKENS).get("/api/jobs", headers={"authorization": header})
    assert response.status_code == 401
    for token in ("tok-api-1", "tok-sched-old", "tok-sched-new"):
        assert token not in response.text


def test_the_page_static_files_and_healthz_need_no_token(client_for: ClientFactory) -> None:
    client = client_for(TOKENS)
    page = client.get("/")
    assert page.status_code == 200 and "Sign in" in page.text
    assert "tok-api-1" not in page.text
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_an_api_token_cannot_enqueue_a_scheduler_only_job(
    app: backroom.App, client_for: ClientFactory
) -> None:
    client = client_for(TOKENS)
    response = client.post("/api/jobs", json=invoice(), headers=bearer("tok-api-1"))
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "source_not_allowed"
    assert body["source"] == "api" and body["allowed"] == ["scheduler"]
    assert "source 'api' may not schedule 'send_invoices'" in body["message"]
    assert app.broker.jobs(backroom.brokers.JobQuery()) == []


def test_each_token_enqueues_as_its_own_source_including_rotated_ones(
    app: backroom.App, client_for: ClientFactory
) -> None:
    client = client_for(TOKENS)
    for token in ("tok-sched-old", "tok-sched-new"):
        response = client.post("/api/jobs", json=invoice(), headers=bearer(token))
        assert response.status_code == 201, response.text
        assert response.json()["source"] == "scheduler"
    logs = {"job": "process_logs", "payload": {"server": "edge-1", "day": "2026-11-21"}}
    job_id = client.post("/api/jobs", json=logs, headers=bearer("tok-api-1")).json()["id"]
    record = app.broker.get(job_id)
    assert record is not None and record.envelope.source == "api"
    assert client.get("/api/whoami", headers=bearer("tok-api-1")).json() == {"source": "api"}
    cancelled = client.post(f"/api/jobs/{job_id}/cancel", headers=bearer("tok-api-1"))
    assert cancelled.status_code == 200
    record = app.broker.get(job_id)
    assert record is not None and record.reason == "cancelled by api"


def test_metrics_need_the_token_too(client_for: ClientFactory) -> None:
    client = client_for(TOKENS)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("tok-api-1")).status_code == 200


def test_the_single_env_token_maps_to_the_dashboard_source(
    app: backroom.App, client_for: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKROOM_DASHBOARD_TOKEN", "one-secret")
    monkeypatch.setenv("BACKROOM_DASHBOARD_TOKENS", "web=tok-web")
    client = client_for()  # tokens=None: read the environment
    assert client.get("/api/jobs").status_code == 401
    assert client.get("/api/whoami", headers=bearer("one-secret")).json() == {"source": "dashboard"}
    assert client.get("/api/whoami", headers=bearer("tok-web")).json() == {"source": "web"}


def test_token_settings_are_parsed_and_mistakes_named_without_the_token() -> None:
    assert parse_tokens("api=tok1, web=tok2,api=tok3,") == {
        "api": ["tok1", "tok3"],
        "web": ["tok2"],
    }
    assert tokens_from_env({"BACKROOM_DASHBOARD_TOKEN": "x"}) == {"dashboard": ["x"]}
    assert tokens_from_env({}) == {}
    with pytest.raises(ConfigError, match="entry 2 is not SOURCE=TOKEN") as caught:
        parse_tokens("api=tok1,secret-without-source")
    assert "secret-without-source" not in str(caught.value)
    with pytest.raises(ConfigError, match="sources 'api' and 'web' share a token"):
        build_tokens({"api": "same", "web": "same"})
    with pytest.raises(ConfigError, match="source 'api' has an empty token"):
        build_tokens({"api": ""})
    assert not build_tokens({})


# -- CSRF: state changes only from this origin --------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # curl, httpx, a worker: not a browser, no ambient credentials to abuse
        ({"origin": "http://testserver"}, True),
        ({"origin": "http://testserver", "sec-fetch-site": "same-origin"}, True),
        ({"origin": "https://evil.example"}, False),
        ({"origin": "http://testserver.evil.example"}, False),
        ({"origin": "http://testserver:8080"}, False),
        ({"origin": "null"}, False),
        ({"sec-fetch-site": "cross-site"}, False),
        ({"sec-fetch-site": "same-site"}, False),
    ],
)
def test_without_tokens_state_changes_must_come_from_the_dashboards_origin(
    app: backroom.App, client_for: ClientFactory, headers: dict[str, str], allowed: bool
) -> None:
    client = client_for(tokens={})
    response = client.post("/api/queues/default/pause", headers=headers)
    if allowed:
        assert response.status_code == 200, response.text
        assert app.broker.paused() == {"default"}
    else:
        assert response.status_code == 403
        assert response.json()["error"] == "cross_site_request"
        assert app.broker.paused() == set()
    # reads stay open to any origin: they change nothing and there is no CORS to read them
    assert client.get("/api/queues", headers=headers).status_code == 200


def test_a_bearer_token_is_proof_enough_against_csrf(client_for: ClientFactory) -> None:
    # A browser never attaches a bearer token by itself, so a request carrying one was built
    # by a script of our own origin (CORS is not enabled: no other origin may send it).
    client = client_for(TOKENS)
    headers = {**bearer("tok-api-1"), "origin": "https://evil.example"}
    assert client.post("/api/queues/default/pause", headers=headers).status_code == 200
    preflight = client.options(
        "/api/jobs",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_a_foreign_host_name_is_refused_when_hosts_are_listed(client_for: ClientFactory) -> None:
    client = client_for(tokens={}, allowed_hosts=["127.0.0.1", "localhost"])
    rebound = client.get("/api/jobs", headers={"host": "attacker.example"})
    assert rebound.status_code == 400 and rebound.json()["error"] == "bad_host"
    assert client.get("/api/jobs", headers={"host": "127.0.0.1:8787"}).status_code == 200
    assert client.get("/", headers={"host": "localhost:8787"}).status_code == 200


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "same"),
    [
        ("http://127.0.0.1:8787", "127.0.0.1:8787", "http", True),
        ("https://jobs.example", "jobs.example", "https", True),
        ("https://jobs.example:443", "jobs.example", "https", True),
        ("http://[::1]:8787", "[::1]:8787", "http", True),
        ("http://jobs.example", "jobs.example", "https", False),
        ("http://127.0.0.1:8788", "127.0.0.1:8787", "http", False),
        ("http://127.0.0.1:notaport", "127.0.0.1:8787", "http", False),
        ("", "127.0.0.1:8787", "http", False),
    ],
)
def test_same_origin(origin: str, host: str, scheme: str, same: bool) -> None:
    assert same_origin(origin, host, scheme) is same


def test_the_page_carries_a_strict_content_security_policy(client_for: ClientFactory) -> None:
    response = client_for(tokens={}).get("/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    script = client_for(tokens={}).get("/static/dashboard.js")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in script.text.replace("never innerHTML", "")


def test_serve_binds_loopback_and_answers_only_loopback_names_without_a_token(
    app: backroom.App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    from backroom.web import serve
    from tests.web.conftest import TestClient

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **options: served.update(web=web, **options))
    monkeypatch.delenv("BACKROOM_DASHBOARD_TOKEN", raising=False)
    monkeypatch.delenv("BACKROOM_DASHBOARD_TOKENS", raising=False)
    serve(app)
    assert (served["host"], served["port"]) == ("127.0.0.1", 8787)
    with TestClient(served["web"]) as client:
        assert client.get("/api/jobs", headers={"host": "rebound.example"}).status_code == 400
        assert client.get("/api/jobs", headers={"host": "127.0.0.1:8787"}).status_code == 200
        assert client.get("/api/jobs", headers={"host": "localhost:8787"}).status_code == 200

    with caplog.at_level("WARNING", logger="backroom.web"):
        serve(app, host="0.0.0.0", port=9000)
    assert "without a token: anyone who can reach it can enqueue" in caplog.text

    serve(app, host="0.0.0.0", tokens={"web": "tok"})
    with TestClient(served["web"]) as client:
        assert client.get("/api/jobs").status_code == 401
        headers = {"host": "jobs.example", "authorization": "Bearer tok"}
        assert client.get("/api/jobs", headers=headers).status_code == 200
