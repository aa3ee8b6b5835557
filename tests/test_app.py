"""The Python API a user relies on: enqueue checks, handles, results, retries, hooks, contexts.
Runs on the memory://, sqlite:// and redis:// brokers with an in-process worker
(run_worker(burst=True))."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import backroom
from backroom.envelope import Envelope, new_id, new_ids
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[backroom.App]:
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'app.db'}"}.get(request.param)
    url = url or request.getfixturevalue("redis_server")
    application = backroom.App(url, source="api", config={"region": "eu"})
    application.broker.purge()  # the session's redis is shared by this process's tests
    seen: dict[str, Any] = {}

    @application.job(tags=("math",))
    def add(ctx: backroom.Context, a: int, b: int = 0) -> int:
        seen["ctx"] = (ctx.job_id, ctx.job, ctx.attempt, ctx.source, ctx.tags, ctx.config)
        ctx.progress(0.5, "halfway")
        return a + b

    @application.job()
    async def shout(ctx: backroom.Context, word: str) -> str:
        await asyncio.sleep(0)
        return word.upper()

    @application.job(retries=2, retry_backoff=0.01)
    def flaky(ctx: backroom.Context, fail_times: int) -> str:
        if ctx.attempt <= fail_times:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return f"ok on attempt {ctx.attempt}"

    @application.job(sources={"scheduler"})
    def send_invoices(ctx: backroom.Context, month: str) -> None: ...

    @application.job()
    def fan_out(ctx: backroom.Context, n: int) -> list[str]:
        return [ctx.enqueue("add", {"a": i}).id for i in range(n)]

    @application.job()
    def double(ctx: backroom.Context, result: int) -> int:
        return result * 2

    @application.job(retries=0)
    def not_json(ctx: backroom.Context) -> object:
        return object()

    application.seen = seen  # type: ignore[attr-defined]
    yield application
    application.close()


def test_a_sync_and_an_async_job_run_and_return_results(app: backroom.App) -> None:
    add = app.enqueue("add", {"a": 2, "b": 3}, tags=["edge-1"])
    shout = app.enqueue("shout", {"word": "hi"})
    assert add.status() == "queued"
    assert app.run_worker(burst=True) == 0
    assert add.result(timeout=5) == 5 and shout.result(timeout=5) == "HI"
    info = add.info()
    assert info["state"] == "succeeded" and info["tags"] == ["math", "edge-1"]
    assert info["source"] == "api" and info["attempts"] == 1 and info["progress"] == 1.0
    assert info["run_time"] is not None and info["wait_time"] is not None
    job_id, job, attempt, source, tags, config = app.seen["ctx"]  # type: ignore[attr-defined]
    assert (job_id, job, attempt, source) == (add.id, "add", 1, "api")
    assert tags == ("math", "edge-1") and config == {"region": "eu"}


def test_enqueue_refuses_what_the_worker_could_not_run(app: backroom.App) -> None:
    with pytest.raises(backroom.UnknownJob, match=r"unknown job 'ad'.*did you mean 'add'\?"):
        app.enqueue("ad", {"a": 1})
    with pytest.raises(backroom.SourceNotAllowed) as refused:
        app.enqueue("send_invoices", {"month": "2026-10"})
    assert str(refused.value) == (
        "source 'api' may not schedule 'send_invoices'; allowed sources: scheduler"
    )
    with pytest.raises(backroom.InvalidPayload) as invalid:
        app.enqueue("add", {"a": "seven"})
    assert invalid.value.field == "a"
    assert str(invalid.value).startswith("invalid payload for 'add': field 'a' expects")
    with pytest.raises(backroom.InvalidPayload, match="field 'a' is required but missing"):
        app.enqueue("add", {})
    with pytest.raises(backroom.InvalidPayload, match="field 'c' is not a parameter"):
        app.enqueue("add", {"a": 1, "c": 2})
    with pytest.raises(backroom.InvalidPayload, match="expects a JSON object, got"):
        app.enqueue("add", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(backroom.PayloadTooLarge, match="over the limit of"):
        app.max_payload_bytes = 100
        app.enqueue("shout", {"word": "x" * 200})
    assert app.enqueue("send_invoices", {"month": "2026-10"}, source="scheduler").status()
    assert app.broker.stats().jobs["send_invoices"].counts == {"queued": 1}


def test_enqueue_many_checks_every_payload_before_storing_any(app: backroom.App) -> None:
    with pytest.raises(backroom.InvalidPayload, match=r"field 'a' .* \(payload #2\)"):
        app.enqueue_many("add", [{"a": 1}, {"a": 2}, {"a": "x"}])
    assert app.broker.stats().jobs == {}
    handles = app.enqueue_many("add", [{"a": n, "b": n} for n in range(50)])
    assert len({h.id for h in handles}) == 50
    app.run_worker(burst=True)
    assert [h.result() for h in handles] == [2 * n for n in range(50)]


def test_enqueue_many_gives_every_job_its_own_id_in_creation_order(app: backroom.App) -> None:
    first = app.enqueue_many("add", [{"a": n, "b": n} for n in range(2000)])
    second = app.enqueue_many("add", [{"a": n, "b": n} for n in range(10)])
    ids = [h.id for h in first + second]
    assert len(set(ids)) == len(ids) and all(len(i) == len(new_id()) for i in ids)
    assert max(h.id for h in first) < min(h.id for h in second)  # ids sort by creation
    assert [h.id for h in first] == sorted(h.id for h in first)  # ... within a batch too
    with pytest.raises(backroom.UnknownJob):  # an unknown job is loud even with no payloads
        app.enqueue_many("nope", [])


def test_a_big_batch_never_gives_two_jobs_one_id() -> None:
    # one microsecond for all: random suffixes alone would clash about once in 100 such batches
    ids = new_ids(200_000)
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(len(i) == len(new_id()) for i in (ids[0], ids[-1]))


def test_a_job_passed_as_its_function_gets_an_error_naming_the_string_to_pass(
    app: backroom.App,
) -> None:
    @app.job()
    def resize(width: int) -> None: ...

    with pytest.raises(backroom.UnknownJob, match=r"named by a string, .*pass its name, 'resize'"):
        app.enqueue(resize, {"width": 1})  # type: ignore[arg-type]
    assert app.broker.stats().jobs == {}


def test_a_misspelt_option_is_a_type_error_naming_it(app: backroom.App) -> None:
    with pytest.raises(TypeError, match="unexpected keyword 'delya'; the options are at, delay"):
        app.enqueue("add", {"a": 1}, delya=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword 'tag'"):
        app.enqueue_many("add", [{"a": 1}], tag="x")  # type: ignore[call-arg]
    assert app.broker.stats().jobs == {}


def test_retries_with_backoff_then_success(app: backroom.App) -> None:
    handle = app.enqueue("flaky", {"fail_times": 2})
    app.run_worker(burst=True)
    assert handle.result(timeout=5) == "ok on attempt 3"
    assert app.broker.stats().jobs["flaky"].retries == 2


def test_a_job_out_of_retries_is_dead_with_its_traceback_and_hooks_fire(
    app: backroom.App,
) -> None:
    failures: list[str] = []
    dead: list[str] = []
    app.on_failure(lambda envelope, exc: failures.append(f"{envelope.job}: {exc}"))
    app.on_dead(lambda envelope, exc: dead.append(type(exc).__name__))

    @app.on_failure
    def broken_hook(envelope: Envelope, exc: BaseException) -> None:
        raise RuntimeError("a hook that raises is logged and skipped")

    handle = app.enqueue("flaky", {"fail_times": 9})
    app.run_worker(burst=True)
    assert handle.status() == "dead"
    error = handle.info()["error"]
    assert error["type"] == "ConnectionError" and error["message"] == "attempt 3 failed"
    assert "raise ConnectionError" in error["traceback"]
    assert failures == [f"flaky: attempt {n} failed" for n in (1, 2, 3)]
    assert dead == ["ConnectionError"]
    with pytest.raises(backroom.JobFailed, match="ended dead: ConnectionError: attempt 3") as exc:
        handle.result(timeout=1)
    assert exc.value.error_type == "ConnectionError"


def test_the_worker_rejects_envelopes_that_got_around_the_producer(app: backroom.App) -> None:
    rejected: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    app.on_reject(lambda envelope, error: rejected.append((envelope.job, type(error).__name__)))
    app.on_failure(lambda envelope, error: failed.append((envelope.job, type(error).__name__)))
    smuggled = [
        Envelope(id=new_id(), job="transcode", source="api", payload={}),
        Envelope(id=new_id(), job="send_invoices", source="api", payload={"month": "x"}),
        Envelope(id=new_id(), job="add", source="api", payload={"a": [1]}),
    ]
    ids = app.broker.enqueue(smuggled)
    good = app.enqueue("add", {"a": 1})
    app.run_worker(burst=True)
    reasons = [app.handle(i).info()["reason"] for i in ids]
    assert [app.handle(i).status() for i in ids] == ["rejected"] * 3
    assert reasons[0] == "unknown job: 'transcode' is not registered by this app"
    assert reasons[1].startswith("source not allowed: 'api' may not schedule it")
    assert reasons[2].startswith("invalid payload: field 'a' expects")
    assert sorted(rejected) == [("add", "InvalidPayload"), ("send_invoices", "SourceNotAllowed"),
                                ("transcode", "UnknownJob")]  # fmt: skip
    assert sorted(failed) == sorted(rejected)  # an error reporter on on_failure hears of them
    assert good.result(timeout=5) == 1
    stats = app.broker.stats().jobs
    assert stats["transcode"].rejections == {"unknown job": 1}
    assert stats["send_invoices"].rejections == {"source not allowed": 1}
    with pytest.raises(backroom.JobFailed, match="ended rejected"):
        app.handle(ids[0]).result(timeout=1)


def test_a_job_can_enqueue_more_jobs_as_its_own_source(app: backroom.App) -> None:
    parent = app.enqueue("fan_out", {"n": 3})
    app.run_worker(burst=True)
    children = [app.handle(i) for i in parent.result(timeout=5)]
    assert [c.info()["source"] for c in children] == ["job:fan_out"] * 3
    assert [c.result(timeout=5) for c in children] == [0, 1, 2]


def test_then_enqueues_a_follow_up_with_the_result(app: backroom.App) -> None:
    first = app.enqueue("add", {"a": 20, "b": 1}, then="double")
    app.run_worker(burst=True)
    assert first.result(timeout=5) == 21
    [follow] = [r for r in app.broker.jobs(backroom_query("double"))]
    assert follow.result == 42 and follow.envelope.source == "job:add"
    with pytest.raises(backroom.UnknownJob):
        app.enqueue("add", {"a": 1}, then="tripple")


def test_a_follow_up_gets_a_dict_result_as_its_payload_unless_it_takes_result(
    app: backroom.App,
) -> None:
    @app.job()
    def count_lines(path: str) -> dict[str, Any]:
        return {"path": path, "lines": 3}

    @app.job()
    def report(path: str, lines: int) -> str:
        return f"{path}: {lines}"

    @app.job()
    def keep(result: dict[str, Any]) -> int:
        return int(result["lines"])

    first = app.enqueue("count_lines", {"path": "a.log"}, then="report")
    second = app.enqueue("count_lines", {"path": "b.log"}, then="keep")
    app.run_worker(burst=True)
    assert first.result(timeout=5) == {"path": "a.log", "lines": 3}
    [reported] = app.broker.jobs(backroom_query("report"))
    [kept] = app.broker.jobs(backroom_query("keep"))
    assert (reported.result, kept.result) == ("a.log: 3", 3)
    assert second.status() == "succeeded"


def test_a_follow_up_that_does_not_fit_the_result_is_rejected_loudly_not_lost(
    app: backroom.App,
) -> None:
    @app.job()
    def shout_it(result: list[str]) -> None: ...

    heard: list[str] = []
    app.on_reject(lambda envelope, error: heard.append(envelope.job))
    first = app.enqueue("add", {"a": 2}, then="shout_it")
    app.run_worker(burst=True)
    assert first.result(timeout=5) == 2
    [follow] = app.broker.jobs(backroom_query("shout_it"))
    assert follow.state == "rejected" and follow.envelope.source == "job:add"
    assert (follow.reason or "").startswith("invalid payload: field 'result'")
    assert heard == ["shout_it"]
    # a follow-up that may never take this job's result is refused at enqueue
    with pytest.raises(backroom.SourceNotAllowed, match="'job:add' may not schedule"):
        app.enqueue("add", {"a": 1}, then="send_invoices")


def backroom_query(job: str) -> Any:
    from backroom.brokers.base import JobQuery

    return JobQuery(job=job)


def test_a_result_that_is_not_json_fails_the_job_clearly(app: backroom.App) -> None:
    handle = app.enqueue("not_json", {})
    app.run_worker(burst=True)
    assert handle.status() == "dead"
    assert "not JSON-serializable" in handle.info()["error"]["message"]


def test_result_waits_and_times_out_with_a_timeout_error(app: backroom.App) -> None:
    handle = app.enqueue("add", {"a": 1})
    with pytest.raises(TimeoutError, match=r"has no result after 0.05 s \(it is queued\)"):
        handle.result(timeout=0.05)
    with pytest.raises(backroom.JobNotFound, match="no job with id 'nope'"):
        app.handle("nope").status()


def test_cancel_before_it_runs_means_it_never_runs(app: backroom.App) -> None:
    handle = app.enqueue("add", {"a": 1})
    assert handle.cancel() is True
    app.run_worker(burst=True)
    info = handle.info()
    assert info["state"] == "cancelled" and info["attempts"] == 0
    assert handle.cancel() is False


def test_bad_keywords_are_refused_with_clear_errors(app: backroom.App) -> None:
    with pytest.raises(backroom.BackroomError, match="delay must be a number of seconds"):
        app.enqueue("add", {"a": 1}, delay=-1)
    with pytest.raises(backroom.BackroomError, match="unique_for must be 'start', 'finish'"):
        app.enqueue("add", {"a": 1}, unique_key="k", unique_for="forever")
    with pytest.raises(backroom.BackroomError, match="unique_for needs a unique_key"):
        app.enqueue("add", {"a": 1}, unique_for="start")
    with pytest.raises(backroom.BackroomError, match="tags must be non-empty strings"):
        app.enqueue("add", {"a": 1}, tags=[""])


def test_registering_a_job_checks_its_signature() -> None:
    application = backroom.App("memory://")
    with pytest.raises(backroom.ConfigError, match=r"parameter 'args' must be a plain"):

        @application.job()
        def bad(ctx: backroom.Context, *args: int) -> None: ...

    @application.job
    def bare(ctx: backroom.Context, when: str = "now") -> str:
        """Docstrings become the registry description."""
        return when

    spec = application.registry.get("bare")
    assert spec.describe()["description"] == "Docstrings become the registry description."
    assert spec.schema()["properties"]["when"]["default"] == "now"


def test_unknown_broker_urls_are_refused_naming_the_choices() -> None:
    with pytest.raises(backroom.ConfigError, match="'mysql://db' is not a broker URL; use sqlite"):
        backroom.App("mysql://db").broker  # noqa: B018
