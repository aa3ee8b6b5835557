"""Every `backroom` command through a real subprocess: the happy path and each bad input, which
must print one clear line on stderr (no traceback) and exit non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backroom.brokers import connect
from tests.helpers import envelope_for, free_port, wait_until

APP = "tests.apps.ledger:app"
NOISY = "tests.apps.noisy:app"
LOG_FORMAT_ENV = "BACKROOM_LOG_FORMAT"  # the documented name, spelled out
ROOT = Path(__file__).resolve().parents[2]


def run(
    *args: str,
    url: str | None = None,
    ok: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != LOG_FORMAT_ENV}  # tests set it
    env = {**inherited, "PYTHONPATH": str(ROOT), **(env or {})}
    if url:
        env["BACKROOM_URL"] = url
    proc = subprocess.run([sys.executable, "-m", "backroom", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)  # fmt: skip
    if ok:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("backroom: "), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    return proc


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_enqueue_prints_the_job_id_alone_and_a_worker_runs_it(url: str) -> None:
    job_id = run("enqueue", "--app", APP, "add", '{"a": 2, "b": 3}', "--tag", "t1", url=url).stdout
    job_id = job_id.strip()
    assert len(job_id) == 23 and job_id.isalnum()
    status = json.loads(run("status", "--app", APP, job_id, "--json", url=url).stdout)
    assert status["state"] == "queued" and status["tags"] == ["t1"] and status["source"] == "api"
    run("worker", "--app", APP, "--burst", "--in-process", url=url)
    assert json.loads(run("result", "--app", APP, job_id, "--timeout", "5", url=url).stdout) == 5
    table = run("status", "--app", APP, job_id, url=url).stdout
    assert "succeeded" in table and "add" in table


def test_names_and_tags_are_printed_as_written_never_read_as_markup(url: str) -> None:
    tag = "[bold]vip[/bold]"
    run("enqueue", "--app", APP, "add", '{"a": 1, "b": 2}', "--tag", tag, url=url)
    run("worker", "--app", APP, "--burst", "--in-process", url=url)
    assert tag in run("jobs", "--app", APP, url=url).stdout
    assert tag in run("stats", "--app", APP, url=url).stdout


def test_the_default_worker_is_a_supervisor_with_child_processes(url: str) -> None:
    job_id = run("enqueue", "--app", APP, "greet", '{"name": "ada"}', url=url).stdout.strip()
    run("worker", "--app", APP, "--burst", "--processes", "2", url=url)
    assert json.loads(run("result", "--app", APP, job_id, url=url).stdout) == "hello ada"


def test_jobs_stats_and_registry_list_every_job_by_name(url: str) -> None:
    run("enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', "--tag", "edge-1", url=url)
    run("enqueue", "--app", APP, "greet", '{"name": "x"}', url=url)
    rows = json.loads(run("jobs", "--app", APP, "--json", url=url).stdout)
    assert [r["job"] for r in rows] == ["greet", "add"]  # newest first
    tagged = json.loads(run("jobs", "--app", APP, "--tag", "edge-1", "--json", url=url).stdout)
    assert [r["job"] for r in tagged] == ["add"]
    assert "greet" in run("jobs", "--app", APP, "--state", "queued", url=url).stdout
    stats = json.loads(run("stats", "--app", APP, "--json", url=url).stdout)
    by_name = {row["job"]: row for row in stats["jobs"]}
    assert by_name["add"]["counts"]["queued"] == 1
    assert "send_invoices" in run("stats", "--app", APP, url=url).stdout
    run("worker", "--app", APP, "--burst", "--in-process", url=url)
    stats = json.loads(run("stats", "--app", APP, "--json", url=url).stdout)
    [edge] = [row for row in stats["tags"] if row["tag"] == "edge-1"]
    assert (edge["counts"]["succeeded"], edge["jobs"]) == (1, ["add"])
    assert (edge["running"], edge["wait_time"]["count"]) == (0, 1)
    assert "jobs by tag" in run("stats", "--app", APP, url=url).stdout
    registry = json.loads(run("registry", "--app", APP, "--json", url=url).stdout)
    invoices = next(e for e in registry if e["name"] == "send_invoices")
    assert invoices["sources"] == ["scheduler"]
    assert invoices["payload_schema"]["properties"]["month"]["type"] == "string"
    assert "send_invoices" in run("registry", "--app", APP, url=url).stdout


def test_cancel_a_queued_job_and_pause_a_queue(url: str) -> None:
    job_id = run("enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', url=url).stdout.strip()
    assert "cancelled" in run("cancel", "--app", APP, job_id, url=url).stdout
    again = run("cancel", "--app", APP, job_id, url=url, ok=False)
    assert "already finished (cancelled)" in again.stderr
    run("queue", "pause", "--app", APP, "default", url=url)
    paused = json.loads(run("stats", "--app", APP, "--json", url=url).stdout)["paused"]
    assert paused == ["default"]
    run("queue", "resume", "--app", APP, "default", url=url)


def test_result_of_a_dead_job_names_its_error(url: str) -> None:
    job_id = run("enqueue", "--app", APP, "always_fails", '{"message": "disk full"}',
                 url=url).stdout.strip()  # fmt: skip
    run("worker", "--app", APP, "--burst", "--in-process", url=url)
    failed = run("result", "--app", APP, job_id, url=url, ok=False)
    assert "ended dead: RuntimeError: disk full" in failed.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "--app", APP, "ad", "{}"], "unknown job 'ad'; this app registers: add, "),
        (
            ["enqueue", "--app", APP, "send_invoices", '{"month": "2026-10"}'],
            "source 'api' may not schedule 'send_invoices'; allowed sources: scheduler",
        ),
        (["enqueue", "--app", APP, "add", '{"a": 1,'], "payload is not valid JSON"),
        (["enqueue", "--app", APP, "add", "[1, 2]"], "payload must be a JSON object"),
        (
            ["enqueue", "--app", APP, "add", '{"a": "one", "b": 2}'],
            "invalid payload for 'add': field 'a' expects a valid integer",
        ),
        (["enqueue", "--app", APP, "add", '{"a": 1}'], "field 'b' is required but missing"),
        (["enqueue", "--app", "no_such_module:app", "add"], "no module named 'no_such_module'"),
        (
            ["enqueue", "--app", "tests.apps.ledger:nothing", "add"],
            "is nothing, not a backroom.App",
        ),
        (["enqueue", "--app", "tests.apps.ledger", "add"], "must look like module:attribute"),
        (["enqueue", "add"], "no app given"),
        (
            ["enqueue", "--app", APP, "--url", "mysql://db", "add", '{"a": 1, "b": 1}'],
            "'mysql://db' is not a broker URL",
        ),
        (
            [
                "enqueue",
                "--app",
                APP,
                "--url",
                "sqlite:////nonexistent/dir/x.db",
                "add",
                '{"a": 1, "b": 1}',
            ],
            "folder '/nonexistent/dir' does not exist",
        ),
        (
            ["enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', "--at", "next tuesday"],
            "--at 'next tuesday' is not an ISO 8601",
        ),
        (
            ["enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', "--delay", "soon"],
            "'soon' is not a number",
        ),
        (
            [
                "enqueue",
                "--app",
                APP,
                "add",
                '{"a": 1, "b": 1}',
                "--unique-key",
                "k",
                "--unique-for",
                "ever",
            ],
            "--unique-for 'ever' must be 'start', 'finish' or a number",
        ),
        (
            ["enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', "--unique-for", "start"],
            "unique_for needs a unique_key",
        ),
        (["status", "--app", APP, "nosuchjob"], "no job with id 'nosuchjob'"),
        (["result", "--app", APP, "nosuchjob"], "no job with id 'nosuchjob'"),
        (["cancel", "--app", APP, "nosuchjob"], "no job with id 'nosuchjob'"),
        (["jobs", "--app", APP, "--state", "done"], "--state 'done' is not a job state"),
        (["worker", "--app", APP, "--concurrency", "0"], "'0' must be 1 or more"),
        (["worker", "--app", APP, "--prefetch", "-1"], "'-1' must be 0 or more"),
        (["worker", "--app", APP, "--prefetch", "many"], "'many' is not a whole number"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["worker", "--app", APP, "--log-format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_bad_input_gets_one_clear_line_and_a_non_zero_exit(
    url: str, args: list[str], message: str
) -> None:
    proc = run(*args, url=url, ok=False)
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import backroom\nimport not_installed_dep\n",
         "ModuleNotFoundError: No module named 'not_installed_dep' ({path}:2)"),
        ("import backroom\napp = backroom.App(\n", "SyntaxError: "),
        ("import os\nraise RuntimeError('DATABASE_URL is not set')\n",
         "RuntimeError: DATABASE_URL is not set ({path}:2)"),
    ],
)  # fmt: skip
def test_an_app_module_that_fails_to_import_gets_one_line_naming_where(
    tmp_path: Path, source: str, message: str
) -> None:
    module = tmp_path / "myjobs.py"
    module.write_text(source)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    command = [sys.executable, "-m", "backroom", "jobs", "--app", "myjobs:app"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("backroom: --app 'myjobs:app': importing myjobs failed: ")
    assert message.format(path=module) in proc.stderr


def test_unique_key_and_expiry_from_the_command_line(url: str) -> None:
    args = ["enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', "--unique-key", "k1",
            "--unique-for", "30", "--expires", "60"]  # fmt: skip
    first = run(*args, url=url).stdout.strip()
    assert run(*args, url=url).stdout.strip() == first
    info = json.loads(run("status", "--app", APP, first, "--json", url=url).stdout)
    assert info["unique_key"] == "k1" and info["expires"] > info["created_at"]


def test_result_timeout_is_reported_not_raised(url: str) -> None:
    job_id = run("enqueue", "--app", APP, "add", '{"a": 1, "b": 1}', url=url).stdout.strip()
    proc = run("result", "--app", APP, job_id, "--timeout", "0.2", url=url, ok=False)
    assert "has no result after 0.2 s (it is queued)" in proc.stderr


# -- logs -----------------------------------------------------------------------------------------


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as one JSON object with time (UTC), level, logger, message."""
    entries = []
    for line in stderr.splitlines():
        entry = json.loads(line)  # fails on any line that is not JSON
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0), line
        entries.append(entry)
    return entries


@pytest.mark.parametrize("how", ["--log-format", LOG_FORMAT_ENV])
def test_a_worker_logs_one_json_object_per_line_with_the_jobs_fields(url: str, how: str) -> None:
    run("enqueue", "--app", NOISY, "parse", '{"lines": 7}', url=url)
    doomed = run("enqueue", "--app", NOISY, "always_fails", '{"message": "disk full"}',
                 "--tag", "nightly", url=url).stdout.strip()  # fmt: skip
    with closing(connect(url)) as broker:  # another program enqueues a job nobody registered
        [stray] = broker.enqueue([envelope_for("no_such_job")])
    worker = ["worker", "--app", NOISY, "--burst"]  # a supervisor and its child: both log
    if how == "--log-format":
        proc = run(*worker, "--log-format", "json", url=url)
    else:
        proc = run(*worker, url=url, env={LOG_FORMAT_ENV: "json"})
    entries = json_lines(proc.stderr)

    def only(**fields: Any) -> dict[str, Any]:
        found = [e for e in entries if all(e.get(k) == v for k, v in fields.items())]
        assert len(found) == 1, (fields, proc.stderr)
        return found[0]

    assert {e["logger"] for e in entries} >= {"backroom.supervisor", "backroom.worker"}
    retried = only(job_id=doomed, level="WARNING")
    assert retried["job"] == "always_fails" and "failed attempt 1" in retried["message"]
    dead = only(job_id=doomed, level="ERROR")
    assert dead["job"] == "always_fails" and "dead after 2 attempts" in dead["message"]
    assert (dead["tags"], dead["attempt"], retried["attempt"]) == (["nightly"], 2, 1)
    assert "payload" not in dead and dead["source"]  # who sent it, never what it carried
    assert only(job_id=stray, level="WARNING")["job"] == "no_such_job"  # rejected
    logged = only(message="parsed 7 lines")  # the job's own line, with its own field
    assert (logged["job"], logged["lines"], logged["logger"]) == ("parse", 7, "backroom.job.parse")
    [hook] = [e for e in entries if "exc_info" in e]  # the on_dead hook raised
    assert (hook["level"], hook["logger"]) == ("ERROR", "backroom.worker")
    assert "error hook" in hook["message"] and "exc_info" not in retried
    assert hook["exc_info"].startswith("Traceback (most recent call last):")
    assert hook["exc_info"].endswith("LookupError: the error tracker is down")


def test_text_stays_the_default_log_format(url: str) -> None:
    run("enqueue", "--app", NOISY, "parse", '{"lines": 7}', url=url)
    proc = run("worker", "--app", NOISY, "--burst", "--in-process", url=url)
    assert " INFO backroom.job.parse: parsed 7 lines" in proc.stderr
    assert not any(line.startswith("{") for line in proc.stderr.splitlines())


def test_verbose_reaches_the_children_of_a_supervisor(url: str) -> None:
    run("enqueue", "--app", NOISY, "parse", '{"lines": 7}', url=url)
    quiet = run("worker", "--app", NOISY, "--burst", url=url)
    assert "parsed 7 lines" in quiet.stderr and "parser details" not in quiet.stderr
    run("enqueue", "--app", NOISY, "parse", '{"lines": 8}', url=url)
    loud = run("worker", "--app", NOISY, "--burst", "-v", url=url)  # a supervisor and a child
    assert " DEBUG backroom.job.parse: parser details: 8" in loud.stderr


def test_a_bad_log_format_in_the_environment_is_one_clear_line(url: str) -> None:
    proc = run("stats", "--app", APP, url=url, ok=False, env={LOG_FORMAT_ENV: "xml"})
    assert "BACKROOM_LOG_FORMAT 'xml' is not a log format; use text or json" in proc.stderr


def test_the_dashboard_logs_json_uvicorns_lines_included(url: str) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BACKROOM_URL": url}
    command = [sys.executable, "-m", "backroom", "dashboard", "--app", APP, "--port", str(port),
               "--log-format", "json"]  # fmt: skip
    with subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_until(lambda: proc.poll() is not None or healthy(port), deadline_s=20,
                       what="the dashboard to answer")  # fmt: skip
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    entries = json_lines(stderr)
    loggers = {e["logger"] for e in entries}
    assert {"backroom.web", "uvicorn.error", "uvicorn.access"} <= loggers, stderr
    access = next(e for e in entries if e["logger"] == "uvicorn.access")
    assert "GET /healthz" in access["message"]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# What a Redis worker process leaves out (issue #9, its memory): the cron parser and the
# scheduler, the SQLite broker, the dashboard and the terminal tables, and difflib (an error
# message's "did you mean"). Each is imported where it is used, never by the worker's path.
NOT_IN_A_REDIS_WORKER = (
    "croniter",
    "backroom.scheduler",
    "sqlite3",
    "backroom.brokers.sqlite",
    "backroom.web",
    "starlette",
    "rich",
    "backroom.terminal",
    "difflib",
)
WORKER_THEN_MODULES = """
import json, sys
from backroom.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.redis
def test_a_redis_worker_imports_nothing_it_does_not_use(tmp_path: Path, redis_server: str) -> None:
    (tmp_path / "plainjobs.py").write_text(
        "import backroom\n\napp = backroom.App(source='api')\n\n\n"
        "@app.job()\ndef add(a: int, b: int) -> int:\n    return a + b\n"
    )
    url = f"{redis_server}?prefix=imports"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    enqueue = [sys.executable, "-m", "backroom", "enqueue", "--app", "plainjobs:app", "--url", url,
               "add", '{"a": 2, "b": 3}']  # fmt: skip
    job_id = subprocess.run(enqueue, env=env, cwd=tmp_path, check=True, capture_output=True,
                            text=True, timeout=60).stdout.strip()  # fmt: skip
    worker = [sys.executable, "-c", WORKER_THEN_MODULES, "worker", "--app", "plainjobs:app",
              "--url", url, "--in-process", "--burst"]  # fmt: skip
    proc = subprocess.run(worker, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0 and "backroom.brokers.redis" in seen["modules"], proc.stderr
    result = [sys.executable, "-m", "backroom", "result", "--app", "plainjobs:app", "--url", url,
              job_id]  # fmt: skip
    ran = subprocess.run(result, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.stdout.strip() == "5", ran.stderr
    assert [m for m in NOT_IN_A_REDIS_WORKER if m in seen["modules"]] == []
