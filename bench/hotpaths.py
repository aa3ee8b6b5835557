"""Profile backroom's hot paths in one process, on its own redis-server (as bench/run.py).

    python bench/hotpaths.py enqueue --store sqlite --cprofile   # rate, then cProfile
    python bench/hotpaths.py batch   --store redis
    python bench/hotpaths.py drain   --store sqlite --spy     # rate, then py-spy (every thread)
    python bench/hotpaths.py drain   --store redis --src /tmp/proto   # a prototype's source tree

`enqueue`/`batch` time app.enqueue / app.enqueue_many; `drain` queues N no-op jobs (one Redis
INCR) and times an in-process burst Worker (concurrency 8) from its start to the last job;
`latency` starts an idle in-process worker (in a thread) and enqueues N probes 20 ms apart.
`--slowlog` lists what redis-server spent per command and per Lua script; `--timers` times
each broker method. `--spy` runs the scenario once more under py-spy (`--gil`: only the
thread holding the GIL is sampled, so the shares are of the Python CPU time) and prints per
thread the functions with the most samples, inclusive and self.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def scenario(args: argparse.Namespace) -> None:
    """Runs inside the profiled process."""
    sys.path.insert(0, args.src)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    import backroom  # the --src tree's
    import redis

    url = os.environ["BENCH_REDIS_URL"]
    store = url if args.store == "redis" else f"sqlite:///{args.dir}/p.db"
    counter = redis.Redis.from_url(url)
    app = backroom.App(store, source="api")

    samples: list[float] = []
    if args.async_jobs:

        @app.job()
        async def incr() -> None:
            counter.incr("bench:count")

        @app.job()
        async def lat(sent: float) -> None:
            samples.append(time.monotonic() - sent)
    else:

        @app.job()
        def incr() -> None:
            counter.incr("bench:count")

        @app.job()
        def lat(sent: float) -> None:
            samples.append(time.monotonic() - sent)

    app.broker.purge()
    app.enqueue("incr")  # connect, create the schema, load the scripts
    timers = _wrap_broker(app.broker) if args.timers else None
    server = _RedisServerCost(counter, args.slowlog)
    rates = []
    cpu_us: list[float] = []  # this process's CPU (all threads) per drained job
    latencies: list[tuple[float, float, float]] = []
    user_sys: list[tuple[float, float]] = []
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
    for _ in range(args.reps):
        app.broker.purge()
        counter.set("bench:count", 0)
        if args.what == "enqueue":
            server.start()
            if profiler:
                profiler.enable()
            t = time.perf_counter()
            cpu = time.process_time()
            for _ in range(args.n):
                app.enqueue("incr")
            rates.append(args.n / (time.perf_counter() - t))
            cpu_us.append((time.process_time() - cpu) / args.n * 1e6)
            server.stop(args.n)
        elif args.what == "batch":
            server.start()
            if profiler:
                profiler.enable()
            t = time.perf_counter()
            cpu = time.process_time()
            for _ in range(args.n // 1000):
                app.enqueue_many("incr", [{}] * 1000)
            rates.append(args.n // 1000 * 1000 / (time.perf_counter() - t))
            cpu_us.append((time.process_time() - cpu) / (args.n // 1000 * 1000) * 1e6)
            server.stop(args.n // 1000 * 1000)
        elif args.what == "latency":
            import threading

            from backroom.worker import Worker

            worker = Worker(app, concurrency=args.concurrency)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            for _ in range(3):  # warm-up
                app.enqueue("lat", {"sent": time.monotonic()})
                time.sleep(0.05)
            samples.clear()
            cpu = time.process_time()
            for _ in range(args.n):
                app.enqueue("lat", {"sent": time.monotonic()})
                time.sleep(0.02)
            deadline = time.monotonic() + 5
            while len(samples) < args.n and time.monotonic() < deadline:
                time.sleep(0.01)
            cpu_us.append((time.process_time() - cpu) / args.n * 1e6)
            worker.stop(immediately=True)
            thread.join(10)
            ordered = sorted(samples)
            p50 = ordered[len(ordered) // 2] * 1000
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
            rates.append(p50)
            latencies.append((p50, p99, ordered[-1] * 1000))
        else:
            for _ in range(args.n // 1000):
                app.enqueue_many("incr", [{}] * 1000)
            from backroom.worker import Worker

            worker = Worker(app, burst=True, concurrency=args.concurrency)
            server.start()
            if profiler:
                profiler.enable()
            t = time.perf_counter()
            cpu = time.process_time()
            times = os.times()
            worker.run()
            elapsed = time.perf_counter() - t
            after = os.times()
            user_sys.append(
                (
                    (after.user - times.user) / (args.n // 1000 * 1000) * 1e6,
                    (after.system - times.system) / (args.n // 1000 * 1000) * 1e6,
                )
            )
            cpu_us.append((time.process_time() - cpu) / (args.n // 1000 * 1000) * 1e6)
            server.stop(args.n // 1000 * 1000)
            done = int(counter.get("bench:count") or 0)
            assert done == args.n // 1000 * 1000, done
            rates.append(done / elapsed)
        if profiler:
            profiler.disable()
    if latencies:
        print(f"latency {args.store}: p50 {statistics.median(x[0] for x in latencies):.2f} ms, "
              f"p99 {statistics.median(x[1] for x in latencies):.2f} ms, max "
              f"{max(x[2] for x in latencies):.2f} ms (runs' p50: "
              f"{', '.join(f'{x[0]:.2f}' for x in latencies)})", flush=True)  # fmt: skip
        return
    print(f"{args.what} {args.store}: median {statistics.median(rates):,.0f}/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})"
          + f"; this process's CPU {statistics.median(cpu_us):.1f} us/job (all threads"
          + (f"; user {statistics.median(u for u, _ in user_sys):.0f}, system "
             f"{statistics.median(s for _, s in user_sys):.0f})" if user_sys else ")"),
          flush=True)  # fmt: skip
    server.report(app.broker if args.store == "redis" else None)
    if timers is not None:
        _print_timers(timers, args.reps)
    if profiler:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


class _RedisServerCost:
    """What redis-server spent per job: its CPU (INFO cpu) and, per command and per Lua script,
    the time SLOWLOG records with a 0 threshold (the command's own execution, no I/O)."""

    def __init__(self, client: Any, slowlog: bool) -> None:
        self.client, self.slowlog = client, slowlog
        self.cpu: list[float] = []
        self.commands: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.jobs = 0

    def _cpu(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def start(self) -> None:
        self._start = self._cpu()
        if not self.slowlog:
            return
        self.client.config_set("slowlog-log-slower-than", 0)
        self.client.config_set("slowlog-max-len", 1_000_000)
        self.client.slowlog_reset()

    def stop(self, jobs: int) -> None:
        self.cpu.append((self._cpu() - self._start) / jobs * 1e6)
        self.jobs += jobs
        if not self.slowlog:
            return
        for entry in self.client.slowlog_get(1_000_000):
            command = entry["command"]
            text = command if isinstance(command, str) else command.decode("latin-1")
            words = text.split()
            name = words[0].lower()
            if name == "evalsha" and len(words) > 1:
                name = "evalsha " + words[1][:40]
            self.commands[name] += entry["duration"]
            self.calls[name] += 1
        self.client.config_set("slowlog-log-slower-than", 10_000)

    def report(self, broker: Any) -> None:
        if not self.cpu:
            return
        names = {}
        for script_name, script in getattr(broker, "_scripts", {}).items():
            names["evalsha " + script.sha[:40]] = f"{script_name}.lua"
        print(f"redis-server CPU {statistics.median(self.cpu):.1f} us/job (job bodies' INCR "
              "included)" + ("; commands by time (us per job, us per call, calls), Lua scripts' "
              "inner commands also listed:" if self.slowlog else ""))  # fmt: skip
        for name, usec in self.commands.most_common(12):
            calls = self.calls[name]
            label = names.get(name, name)
            print(f"  {label:28s} {usec / self.jobs:7.2f} {usec / calls:9.1f} {calls:8d}")


def _wrap_broker(broker: object) -> dict[str, list[float]]:
    """Time every broker method (calls, seconds, items per call) from here on."""
    timers: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
    for name in (
        "enqueue",
        "claim",
        "ack",
        "nack",
        "extend",
        "wait_for_work",
        "promote_due",
        "sweep_expired",
        "stats",
        "cancel_requested",
        "register_worker",
        "get",
    ):
        method = getattr(broker, name, None)
        if method is None:
            continue

        def timed(*a: object, __method=method, __name=name, **k: object) -> object:
            t = time.perf_counter()
            out = __method(*a, **k)
            entry = timers[__name]
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            if isinstance(out, list):
                entry[2] += len(out)
            elif __name in ("ack", "enqueue"):
                entry[2] += len(a[0])  # type: ignore[arg-type]
            return out

        setattr(broker, name, timed)
    return timers


def _print_timers(timers: dict[str, list[float]], reps: int) -> None:
    print("broker calls (all reps):  calls   total s   ms/call   items/call")
    for name, (calls, total, items) in sorted(timers.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:18s} {calls:7.0f} {total:9.3f} {1000 * total / calls:9.3f} "
              f"{items / calls if calls else 0:10.1f}")  # fmt: skip


def summarize(raw: Path, top: int) -> None:
    """py-spy raw output: 'thread (TID): NAME;frame;frame;... count' lines (NAME not always)."""
    lines = [line.rpartition(" ") for line in raw.read_text().splitlines()]
    names: dict[str, str] = {}
    for stack, _, _ in lines:
        head = stack.split(";", 1)[0]
        tid, _, name = head.partition(": ")
        if name:
            names[tid] = name.rstrip("0123456789-_").strip() or name
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for stack, _, count in lines:
        frames = stack.split(";")
        tid = frames[0].partition(": ")[0]
        thread = names.get(tid, tid)
        n = int(count)
        totals[thread] += n
        seen = set()
        for frame in frames[1:]:
            name = _short(frame)
            if name not in seen:
                by_thread[thread][name] += n
                seen.add(name)
        if len(frames) > 1:
            own[thread][_short(frames[-1])] += n
    grand = sum(totals.values())
    print(f"\npy-spy --gil: {grand} samples; share of each thread, then its functions")
    for thread, total in totals.most_common():
        print(f"\n== {thread}: {total} samples ({100 * total / grand:.0f}% of all)")
        print("   inclusive:")
        for name, n in by_thread[thread].most_common(top):
            print(f"   {100 * n / total:5.1f}%  {name}")
        print("   self:")
        for name, n in own[thread].most_common(top // 2):
            print(f"   {100 * n / total:5.1f}%  {name}")


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["enqueue", "batch", "drain", "latency"])
    parser.add_argument("--store", choices=["redis", "sqlite"], default="sqlite")
    parser.add_argument("-n", type=int, default=None, help="jobs (default 5,000; drain 20,000)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (s)")
    parser.add_argument("--async-jobs", action="store_true", help="async def job bodies")
    parser.add_argument("--src", default=str(BENCH.parent), help="backroom source tree")
    parser.add_argument(
        "--slowlog",
        action="store_true",
        help="redis: time every command and script (SLOWLOG at 0 us; slows it)",
    )
    parser.add_argument("--timers", action="store_true", help="time each broker method")
    parser.add_argument("--cprofile", action="store_true", help="cProfile (main thread only)")
    parser.add_argument("--spy", action="store_true", help="also sample with py-spy")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n is None:
        args.n = {"drain": 20_000, "latency": 200}.get(args.what, 5_000)
    if args.inner:
        scenario(args)
        return 0

    sys.path.insert(0, str(BENCH))
    from run import redis_server

    forwarded = [a for a in sys.argv[1:] if a != "--spy"]
    with redis_server() as url, tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        env = {**os.environ, "BENCH_REDIS_URL": url}
        inner = [sys.executable, __file__, *forwarded, "--inner", "--dir", folder]
        subprocess.run(inner, env=env, check=True)
        if args.spy:
            raw = Path(folder) / "spy.txt"
            subprocess.run(
                ["py-spy", "record", "--threads", "--gil", "--rate", str(args.rate), "--format",
                 "raw", "--output", str(raw), "--",
                 *[a for a in inner if a not in ("--slowlog", "--timers")], "--reps", "1"],
                env=env, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            summarize(raw, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
