"""The `backroom` command: parses arguments, calls the library, prints. No logic of its own.
A user mistake prints one line on stderr (`backroom: ...`) and exits non-zero, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn

from backroom.app import App
from backroom.brokers.base import JobQuery
from backroom.envelope import State
from backroom.errors import BackroomError, ConfigError, JobFailed
from backroom.reporting import LOG_FORMAT_ENV, LOG_FORMATS, TEXT_LOG_FORMAT, JsonLogFormatter

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"backroom: {message} (see `{self.prog} --help`)\n")


def load_app(path: str | None, url: str | None) -> App:
    """Import `module:attribute` and return the App there; `url` overrides its broker URL."""
    path = path or os.environ.get("BACKROOM_APP")
    if not path:
        raise ConfigError("no app given; pass --app module:attribute or set BACKROOM_APP")
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(
            f"--app {path!r} must look like module:attribute, e.g. myproject.jobs:app"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module is not there, its code raised, or does not compile
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing and module_name.startswith(missing):
            raise ConfigError(
                f"--app {path!r}: no module named {missing!r} (run from the project's folder or "
                "check PYTHONPATH)"
            ) from None
        failed = f"--app {path!r}: importing {module_name} failed: {_where(exc)}"
        raise ConfigError(failed) from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        raise ConfigError(
            f"--app {path!r}: {module_name}.{attribute} is {found}, not a backroom.App"
        )
    if url:
        app.url = url
    return app


def _where(exc: BaseException) -> str:
    """An exception and the line that raised it, on one line: `ValueError: bad (jobs.py:12)`."""
    if isinstance(exc, SyntaxError):
        filename, line = exc.filename, exc.lineno
        text = f"SyntaxError: {exc.msg}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        own = [f for f in frames if "importlib" not in f.filename] or frames
        filename, line = (own[-1].filename, own[-1].lineno) if own else (None, None)
        text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({filename}:{line})" if filename else text


# -- commands ------------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    queues = _list(args.queues)
    if args.in_process:
        from backroom.worker import Worker

        worker = Worker(
            app, queues=queues, concurrency=args.concurrency, lease=args.lease, burst=args.burst,
            scheduler=args.scheduler, grace=args.grace, cancel_grace=args.cancel_grace,
            max_jobs=args.max_jobs_per_child if args.child else None,
            max_memory_mb=args.max_memory_per_child if args.child else None, child=args.child,
            timeout=args.timeout, prefetch=args.prefetch,
        )  # fmt: skip
        _trim_heap()
        return worker.run()
    from backroom.supervisor import Supervisor

    app.broker  # noqa: B018 - fail here, once, on a bad URL rather than in every child
    child_args = ["--app", args.app or os.environ["BACKROOM_APP"],
                  "--concurrency", str(args.concurrency), "--lease", str(args.lease),
                  "--grace", str(args.grace), "--cancel-grace", str(args.cancel_grace)]  # fmt: skip
    if args.url:
        child_args += ["--url", args.url]
    if args.queues:
        child_args += ["--queues", args.queues]
    if args.max_jobs_per_child:
        child_args += ["--max-jobs-per-child", str(args.max_jobs_per_child)]
    if args.max_memory_per_child:
        child_args += ["--max-memory-per-child", str(args.max_memory_per_child)]
    if args.timeout:
        child_args += ["--timeout", str(args.timeout)]
    if args.prefetch is not None:
        child_args += ["--prefetch", str(args.prefetch)]
    child_args += ["--log-format", args.log_format]  # the children log as the supervisor does
    if args.verbose:
        child_args.append("--verbose")
    return Supervisor(child_args, args.processes, burst=args.burst, scheduler=args.scheduler).run()


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing):
    importing the app and connecting leave about 1 MB freed but still resident in a worker."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a libc without malloc_trim
        return
    trim(0)


def cmd_scheduler(args: argparse.Namespace) -> int:
    import signal
    import threading

    from backroom.scheduler import Scheduler

    stop = threading.Event()  # handlers first: a SIGTERM during start-up is still a clean stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app = load_app(args.app, args.url)
    if not app.schedules:
        raise ConfigError(f"app {args.app or os.environ.get('BACKROOM_APP')} declares no schedules")
    logging.getLogger("backroom").info("scheduler running %d schedule(s)", len(app.schedules))
    Scheduler(app).run(stop)
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    payload = _json_object(args.payload, "payload")
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            raise ConfigError(f"--at {args.at!r} is not an ISO 8601 date and time") from None
    handle = app.enqueue(
        args.job, payload, source=args.source, tags=args.tag or (), delay=args.delay, at=at,
        unique_key=args.unique_key, unique_for=_unique_for(args.unique_for), queue=args.queue,
        priority=args.priority, expires=args.expires,
    )  # fmt: skip
    print(handle.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    info = app.handle(args.job_id).info()
    if args.json:
        _print_json(info)
        return 0
    from backroom import terminal

    terminal.print_info(info)
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    try:
        result = app.handle(args.job_id).result(timeout=args.timeout)
    except JobFailed as exc:
        print(f"backroom: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print_json(result)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    handle = app.handle(args.job_id)
    handle.info()  # JobNotFound for an unknown id
    if handle.cancel():
        print(f"{args.job_id} cancelled" if handle.status() == "cancelled"
              else f"{args.job_id} is running and was told to stop")  # fmt: skip
        return 0
    print(f"backroom: job {args.job_id} already finished ({handle.status()}); nothing to cancel",
          file=sys.stderr)  # fmt: skip
    return EXIT_ERROR


def cmd_jobs(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    state = _state(args.state)
    records = app.broker.jobs(JobQuery(state=state, job=args.job, tag=args.tag, limit=args.limit))
    rows = [app.describe(r) for r in records]
    if args.json:
        _print_json(rows)
        return 0
    from backroom import terminal

    terminal.print_jobs(rows)
    if app.schedules and state is None and args.job is None and args.tag is None:
        from backroom.reporting import stats_summary

        terminal.print_schedules(stats_summary(app)["schedules"])
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from backroom import terminal
    from backroom.reporting import stats_summary, tag_report

    app = load_app(args.app, args.url)
    summary = stats_summary(app)
    summary.update(tag_report(app))
    if args.json:
        _print_json(summary)
    else:
        terminal.print_stats(summary)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    entries = [spec.describe() for spec in app.registry]
    if args.json:
        _print_json(entries)
        return 0
    from backroom import terminal

    terminal.print_registry(entries)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    if args.action == "pause":
        app.broker.pause(args.name)
        print(f"queue {args.name!r} paused: workers stop reserving from it")
    else:
        app.broker.resume(args.name)
        print(f"queue {args.name!r} resumed")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    app = load_app(args.app, args.url)
    from backroom.web import serve

    # uvicorn's own log set-up writes text; without it, its records reach our handler
    options: dict[str, Any] = {"log_config": None} if args.log_format == "json" else {}
    serve(app, host=args.host, port=args.port, **options)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from backroom.demo import run_demo

    return run_demo(jobs=args.jobs, url=args.url, keep=args.keep)


# -- parsing -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backroom", description="Background jobs for Python applications.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str,
                app: bool = True) -> argparse.ArgumentParser:  # fmt: skip
        sub = commands.add_parser(name, help=help, description=help)
        if app:
            sub.add_argument("--app", help="module:attribute of the App (default $BACKROOM_APP)")
        sub.add_argument("--url", help="broker URL (default: the App's, else $BACKROOM_URL)")
        sub.add_argument("-v", "--verbose", action="store_true", help="log debug details")
        sub.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            help=f"log lines as text or one JSON object per line (default ${LOG_FORMAT_ENV}, "
            "else text)",
        )
        sub.set_defaults(handler=handler)
        return sub

    sub = command("worker", cmd_worker, "run jobs: a supervisor and its worker processes")
    sub.add_argument("--queues", help="comma-separated queues, served in this order")
    sub.add_argument(
        "--concurrency", type=_positive_int, default=8, help="jobs at once per process"
    )
    sub.add_argument("--processes", type=_positive_int, default=1, help="worker processes")
    sub.add_argument(
        "--in-process",
        action="store_true",
        help="run jobs in this process: least overhead, no crash isolation",
    )
    sub.add_argument(
        "--lease",
        type=_positive_float,
        default=60.0,
        help="seconds a job stays reserved without a heartbeat (default 60)",
    )
    sub.add_argument("--burst", action="store_true", help="exit 0 once nothing is left to do")
    sub.add_argument("--scheduler", action="store_true", help="also fire the cron schedules")
    sub.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        help="seconds running jobs get to finish on SIGTERM (default 30)",
    )
    sub.add_argument(
        "--cancel-grace",
        type=_non_negative_float,
        default=10.0,
        help="seconds a cancelled running job gets to stop (default 10)",
    )
    sub.add_argument(
        "--timeout", type=_positive_float, help="default timeout in seconds for jobs that set none"
    )
    sub.add_argument(
        "--prefetch",
        type=_non_negative_int,
        help="jobs each process claims beyond its free slots (default: about 50 ms of work, "
        "by the recent run times; 0 claims only free slots)",
    )
    sub.add_argument(
        "--max-jobs-per-child", type=_positive_int, help="recycle a child after N jobs"
    )
    sub.add_argument(
        "--max-memory-per-child",
        type=_positive_float,
        help="recycle a child past this many MB of memory",
    )
    sub.add_argument("--child", action="store_true", help=argparse.SUPPRESS)

    command("scheduler", cmd_scheduler, "fire the app's cron schedules")

    sub = command("enqueue", cmd_enqueue, "enqueue one job; prints its id")
    sub.add_argument("job", help="job name")
    sub.add_argument("payload", nargs="?", default="{}", help="JSON object (default {})")
    sub.add_argument("--source", help="who asks (default: the App's source)")
    sub.add_argument("--tag", action="append", help="tag the job (repeatable)")
    sub.add_argument("--delay", type=_non_negative_float, help="seconds to wait before it runs")
    sub.add_argument("--at", help="ISO 8601 time to run at")
    sub.add_argument("--unique-key", help="no second live job with this key")
    sub.add_argument(
        "--unique-for", help="how long the key holds: start, finish (default) or SECONDS"
    )
    sub.add_argument(
        "--expires", type=_positive_float, help="never start it after SECONDS from now"
    )
    sub.add_argument("--queue", help="queue (default: the job's)")
    sub.add_argument("--priority", type=int, help="higher runs earlier (default: the job's)")

    sub = command("status", cmd_status, "one job's state, attempts, progress, timings, error")
    sub.add_argument("job_id")
    sub.add_argument("--json", action="store_true")

    sub = command("result", cmd_result, "wait for a job's result and print it as JSON")
    sub.add_argument("job_id")
    sub.add_argument(
        "--timeout", type=_non_negative_float, help="seconds to wait (default: forever)"
    )

    sub = command("cancel", cmd_cancel, "cancel a job (running jobs are told to stop)")
    sub.add_argument("job_id")

    sub = command("jobs", cmd_jobs, "recent jobs, newest first")
    sub.add_argument("--state", help="one of: " + ", ".join(s.value for s in State))
    sub.add_argument("--job", help="job name")
    sub.add_argument("--tag")
    sub.add_argument("--limit", type=_positive_int, default=50)
    sub.add_argument("--json", action="store_true")

    sub = command("stats", cmd_stats, "per job name and tag: counts, run and wait times")
    sub.add_argument("--json", action="store_true")

    sub = command("registry", cmd_registry, "every job: queue, sources, retries, payload schema")
    sub.add_argument("--json", action="store_true")

    sub = command("queue", cmd_queue, "pause or resume reservation from a queue")
    sub.add_argument("action", choices=["pause", "resume"])
    sub.add_argument("name")

    sub = command("dashboard", cmd_dashboard, "serve the web dashboard and HTTP API")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=_port, default=8787)

    sub = command("demo", cmd_demo, "run the example app end to end on SQLite", app=False)
    sub.add_argument("--jobs", type=_positive_int, default=300, help="how many jobs (default 300)")
    sub.add_argument("--keep", action="store_true", help="keep the demo database afterwards")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.log_format = _log_format(args.log_format)
        handler = logging.StreamHandler(sys.stderr)
        if args.log_format == "json":
            handler.setFormatter(JsonLogFormatter())
        else:
            handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            handlers=[handler])  # fmt: skip
        if args.command not in ("worker", "scheduler", "dashboard"):
            logging.getLogger("backroom").setLevel(logging.WARNING)
        return int(args.handler(args))
    except BackroomError as exc:
        print(f"backroom: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


# -- argument types ------------------------------------------------------------------------------


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} must be {least} or more")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return value


def _log_format(flag: str | None) -> str:
    """--log-format, else $BACKROOM_LOG_FORMAT, else text."""
    if flag is not None:
        return flag
    value = os.environ.get(LOG_FORMAT_ENV, "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ConfigError(f"{LOG_FORMAT_ENV} {os.environ[LOG_FORMAT_ENV]!r} is not a log format; "
                          f"use {' or '.join(LOG_FORMATS)}")  # fmt: skip
    return value


def _list(text: str | None) -> list[str] | None:
    if not text:
        return None
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ConfigError(f"--queues {text!r} names no queue")
    return items


def _unique_for(text: str | None) -> str | float | None:
    if text is None or text in ("start", "finish"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ConfigError(
            f"--unique-for {text!r} must be 'start', 'finish' or a number of seconds"
        ) from None


def _state(text: str | None) -> State | None:
    if text is None:
        return None
    try:
        return State(text)
    except ValueError:
        states = ", ".join(s.value for s in State)
        raise ConfigError(f"--state {text!r} is not a job state; use one of: {states}") from None


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}"
                          ) from None  # fmt: skip
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"backroom {version('backroom')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "backroom (source tree)"
