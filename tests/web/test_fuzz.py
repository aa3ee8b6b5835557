"""Hostile input survived: random bytes, random JSON and random near-valid requests thrown at the
HTTP API always get a clear answer (2xx for the rare valid one, else a 4xx JSON error with a
message), never a 500 and never a hang."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import backroom
from backroom.web import create_app
from backroom.web.checks import ENQUEUE_FIELDS
from tests.web.conftest import TestClient, build_app

ANSWERS = {200, 201, 400, 403, 404, 405, 409, 413, 415, 422}
FUZZ = settings(max_examples=100, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def fuzz_app() -> Iterator[backroom.App]:
    app = build_app("memory://")
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(fuzz_app: backroom.App) -> Iterator[TestClient]:
    with TestClient(create_app(fuzz_app, tokens={})) as test_client:
        yield test_client


def assert_clear_answer(response: Any) -> None:
    assert response.status_code in ANSWERS, (response.status_code, response.text[:500])
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"]
        assert isinstance(body["message"], str) and body["message"]


@FUZZ
@given(body=st.binary(max_size=2000))
@example(body=b'"\x80"')  # JSON whose string is not UTF-8 (found by this test in CI)
def test_random_bytes_get_a_clear_answer(client: TestClient, body: bytes) -> None:
    response = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert_clear_answer(response)


@FUZZ
@given(body=json_values)
def test_random_json_gets_a_clear_answer(client: TestClient, body: Any) -> None:
    response = client.post(
        "/api/jobs", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert_clear_answer(response)


fields = st.sampled_from([*ENQUEUE_FIELDS, "source", "id"])  # and two it must refuse
jobs = st.sampled_from(["process_logs", "send_email", "send_invoices", "always_fails"])
payload_keys = st.sampled_from(["server", "day", "to", "password", "month", "message", "x"])


@FUZZ
@given(
    job=jobs | st.text(max_size=20),
    payload=st.dictionaries(payload_keys | st.text(max_size=8), json_values, max_size=4),
    extra=st.dictionaries(fields, json_values, max_size=3),
)
def test_near_valid_enqueues_get_a_clear_answer(
    client: TestClient, job: str, payload: dict[str, Any], extra: dict[str, Any]
) -> None:
    body = {"job": job, "payload": payload, **extra}
    # json.dumps writes Infinity for an infinite float: not JSON, which the API must say
    response = client.post(
        "/api/jobs", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert_clear_answer(response)


filters = st.sampled_from(["state", "job", "tag", "limit", "before", "page"])


@FUZZ
@given(params=st.dictionaries(filters | st.text(max_size=6), st.text(max_size=40), max_size=4))
def test_random_filters_get_a_clear_answer(client: TestClient, params: dict[str, str]) -> None:
    assert_clear_answer(client.get("/api/jobs", params=params))


@FUZZ
@given(
    job_id=st.text(min_size=1, max_size=300).filter(lambda s: "/" not in s and s not in ".."),
    action=st.sampled_from(["", "/cancel", "/retry", "/delete"]),
    method=st.sampled_from(["GET", "POST"]),
)
def test_random_ids_get_a_clear_answer(
    client: TestClient, job_id: str, action: str, method: str
) -> None:
    from urllib.parse import quote

    response = client.request(method, f"/api/jobs/{quote(job_id, safe='')}{action}")
    if response.status_code == 200 and method == "GET" and not action:
        return  # an id that happens to exist
    assert_clear_answer(response)


@FUZZ
@given(body=json_values, action=st.sampled_from(["retry", "delete"]))
def test_random_bulk_filters_get_a_clear_answer(client: TestClient, body: Any, action: str) -> None:
    response = client.post(
        f"/api/bulk/{action}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    assert_clear_answer(response)
