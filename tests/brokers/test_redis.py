"""What only the Redis broker promises: apps isolated by key prefix, finished records that
expire, a compact queued job, no keyspace scans, blocking waits, surviving a redis-server
restart, Sentinel failover, TLS with an ACL user, unix sockets, calls repeated after a lost
reply, and the same answers as the SQLite broker under random work. Real redis-server
processes on loopback: the session's, or the test's own where it stops or configures one."""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis

from backroom.brokers import Claim, JobQuery, connect
from backroom.brokers.base import TIMELINE_KEEP_S
from backroom.brokers.redis import RedisBroker
from backroom.envelope import Envelope, State, new_id
from backroom.errors import BrokerError, ConfigError
from tests.brokers.test_conformance import FAILURE
from tests.helpers import envelope_for, free_port, redis_answers, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

T = 2_000_000_000.0


class RedisProcess:
    """A redis-server of the test's own on a free loopback port; stop() and start() again keep
    its port and its folder (so its append-only file survives a restart)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self, *extra: str) -> None:
        exe = shutil.which("redis-server") or pytest.fail("redis-server not found on PATH")
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            [exe, *extra, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--dir", str(self.workdir), "--logfile", str(log), *self.args],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        proc = self.proc
        wait_until(
            lambda: proc.poll() is not None or redis_answers(self.url),
            deadline_s=10,
            what=f"redis-server on port {self.port}",
        )
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes its append-only file, exits
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def own_redis() -> Iterator[list[RedisProcess]]:
    """Processes the test starts; all stopped at the end."""
    started: list[RedisProcess] = []
    yield started
    for server in started:
        server.stop()


def keys_under(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match="{" + prefix + "}:*", count=1000))


# -- prefixes ----------------------------------------------------------------------------------


def test_two_apps_with_their_own_prefix_share_one_redis_without_seeing_each_other(
    redis_server: str,
) -> None:
    with (
        closing(connect(redis_server + "?prefix=billing")) as billing,
        closing(connect(redis_server + "?prefix=media")) as media,
    ):
        billing.purge()
        media.purge()
        invoice = billing.enqueue([envelope_for("send_invoices", tags=("2033-05",))], now=T)[0]
        video = media.enqueue([envelope_for("resize_video", unique_key="video:7")], now=T)[0]
        assert media.get(invoice) is None
        assert [r.id for r in media.jobs(JobQuery())] == [video]
        assert media.jobs(JobQuery(tag="2033-05")) == []
        assert set(media.stats().jobs) == {"resize_video"}
        assert [c.id for c in media.claim(["default"], "w1", 30, limit=10, now=T)] == [video]
        [claim] = billing.claim(["default"], "w1", 30, limit=10, now=T)
        assert claim.id == invoice
        media.purge()  # one app's reset leaves the other alone
        assert billing.get(invoice) is not None
        assert billing.ack([(claim, {"sent": 1})], now=T + 1) == [True]
        client = redis.Redis.from_url(redis_server)
        keys = keys_under(client, "billing")
        assert keys, "the billing app stored nothing under its prefix"
        # one hash tag for all of an app's keys: one Redis Cluster slot
        assert all(key.startswith(b"{billing}:") for key in keys)
        assert keys_under(client, "media") == []
        billing.purge()
        assert keys_under(client, "billing") == []


# -- result ttl --------------------------------------------------------------------------------


def test_finished_records_expire_after_the_result_ttl_dead_ones_four_times_later(
    redis_server: str,
) -> None:
    with closing(connect(redis_server + "?prefix=ttl&result_ttl=100")) as broker:
        assert isinstance(broker, RedisBroker)
        broker.purge()
        client = redis.Redis.from_url(redis_server)
        ok, failed = broker.enqueue([envelope_for("resize_video") for _ in range(2)], now=T)
        claims = {c.id: c for c in broker.claim(["default"], "w1", 30, limit=2, now=T)}
        assert broker.ack([(claims[ok], "done")], now=T + 1) == [True]
        assert broker.nack(claims[failed], FAILURE, retry_at=None, now=T + 1) is True
        # Redis drops the record by itself (a margin after the ttl: the sweep goes first) ...
        ok_ttl = client.pttl(f"{{ttl}}:d:{ok}") / 1000
        dead_ttl = client.pttl(f"{{ttl}}:d:{failed}") / 1000
        assert 100 < ok_ttl <= 100 + 60
        assert 400 < dead_ttl <= 400 + 60
        # ... and the sweep forgets it, index entries included, once the ttl has passed
        broker.sweep_expired(now=T + 99)
        assert broker.get(ok) is not None
        broker.sweep_expired(now=T + 102)
        assert broker.get(ok) is None
        assert [r.id for r in broker.jobs(JobQuery())] == [failed]
        assert broker.jobs(JobQuery(state=State.SUCCEEDED)) == []
        broker.sweep_expired(now=T + 402)
        assert broker.get(failed) is None
        assert broker.jobs(JobQuery(job="resize_video")) == []
        # counts of final states are totals: forgetting records does not rewrite them
        assert broker.stats().jobs["resize_video"].counts == {"succeeded": 1, "dead": 1}
        broker.purge()


def test_a_live_job_never_expires(redis_server: str) -> None:
    with closing(connect(redis_server + "?prefix=live&result_ttl=1")) as broker:
        broker.purge()
        queued = broker.enqueue([envelope_for("resize_video")], now=T)[0]
        broker.sweep_expired(now=T + 10_000)
        assert redis.Redis.from_url(redis_server).pttl("{live}:j") == -1
        assert broker.get(queued) is not None
        broker.purge()


def test_a_claim_repeated_after_its_reply_was_lost_returns_the_same_jobs(
    redis_server: str,
) -> None:
    """A claim whose reply never arrived (a timeout while Redis was frozen) is sent again with
    the same salt: it must hand over what the first one took, not take more and strand those."""
    with closing(connect(redis_server + "?prefix=repeat")) as broker:
        assert isinstance(broker, RedisBroker)
        broker.purge()
        broker.enqueue([envelope_for("resize_video") for _ in range(5)], now=T)
        call = ("claim", T, T + 60, "w1", 3, "salt-1.", 0, "default")
        first = broker._run(*call)
        again = broker._run(*call)  # the same call: its first reply "lost"
        assert again == first
        others = broker.claim(["default"], "w2", 60, 10, now=T)
        assert len(others) == 2  # nothing else was taken by the repeat
        held = broker.stats().jobs["resize_video"].counts
        assert held == {"running": 5}
        broker.purge()


# -- memory ------------------------------------------------------------------------------------


def test_a_queued_noop_job_costs_at_most_200_bytes_with_its_record(
    redis_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = 50_000
    with closing(connect(redis_server + "?prefix=memory")) as broker:
        broker.purge()
        client = redis.Redis.from_url(redis_server)
        before = client.info("memory")["used_memory"]
        for _ in range(jobs // 1000):  # what App.enqueue_many("incr", [{}] * 1000) sends
            now = time.time()
            broker.enqueue(
                [
                    Envelope(id=new_id(), job="incr", source="api", created_at=now)
                    for _ in range(1000)
                ]
            )
        delta = (client.info("memory")["used_memory"] - before) / jobs
        usage = sum(
            client.memory_usage(key, samples=0) or 0 for key in keys_under(client, "memory")
        )
        per_job = usage / jobs
        with capsys.disabled():
            print(f"\nredis bytes per queued no-op job: {per_job:.1f} (MEMORY USAGE), "
                  f"{delta:.1f} (used_memory delta)")  # fmt: skip
        assert per_job <= 200
        assert broker.stats().queues == {"default": jobs}
        broker.purge()


# -- no scans ----------------------------------------------------------------------------------


def test_enqueue_claim_outcomes_listing_and_stats_never_scan_the_keyspace(
    redis_server: str,
) -> None:
    with closing(connect(redis_server + "?prefix=noscan")) as broker:
        broker.purge()
        client = redis.Redis.from_url(redis_server)
        client.config_resetstat()
        ids = broker.enqueue(
            [envelope_for("resize_video", tags=("edge-1",), priority=n % 3) for n in range(30)]
            + [envelope_for("send_email", eta=T + 60) for _ in range(5)],
            now=T,
        )
        claims = broker.claim(["default"], "w1", 30, limit=20, now=T)
        broker.ack([(c, None) for c in claims[:10]], now=T + 1)
        broker.nack(claims[10], FAILURE, retry_at=T + 5, now=T + 1)
        broker.reject(claims[11], "bad signature", now=T + 1)
        broker.cancel(ids[-1], now=T + 1)
        broker.promote_due(now=T + 100)
        broker.sweep_expired(now=T + 100)
        for query in (
            JobQuery(),
            JobQuery(state=State.QUEUED),
            JobQuery(job="resize_video"),
            JobQuery(tag="edge-1", state=State.SUCCEEDED),
            JobQuery(before=ids[20]),
        ):
            broker.jobs(query)  # fmt: skip
        broker.stats(tags=True)
        broker.timeline(T - 60, now=T + 100)
        broker.failure_groups()
        broker.get_many(ids)
        broker.wait_for_work(["default"], 0.01)
        commands = client.info("commandstats")
        assert "cmdstat_keys" not in commands
        assert "cmdstat_scan" not in commands
        broker.purge()


# -- per tag and per minute ---------------------------------------------------------------------


def test_minute_hashes_expire_once_they_leave_the_timeline(redis_server: str) -> None:
    with closing(connect(redis_server + "?prefix=minutes")) as broker:
        broker.purge()
        now = time.time()
        broker.enqueue([envelope_for("resize_video")], now=now)
        [claim] = broker.claim(["default"], "w1", 30, limit=1, now=now)
        broker.ack([(claim, None)], now=now)
        client = redis.Redis.from_url(redis_server)
        [key] = client.keys("{minutes}:m:*")  # a test may look; the broker never does
        assert key == f"{{minutes}}:m:{int(now // 60)}".encode()
        ttl = client.ttl(key)
        assert TIMELINE_KEEP_S <= ttl <= TIMELINE_KEEP_S + 60
        broker.purge()


def counter_calls(client: redis.Redis) -> int:
    """How many HINCRBY, SISMEMBER and EXPIRE commands the server has run."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("hincrby", "sismember", "expire"))  # fmt: skip


def counter_writes_for_an_ack_of(broker: RedisBroker, client: redis.Redis, jobs: int) -> int:
    """HINCRBY, SISMEMBER and EXPIRE commands (counters, the tag cap, the minute's expiry) an
    ack of `jobs` tagged jobs runs; they all ran 1 s, so they share one histogram bucket."""
    broker.purge()
    tags = ("edge-1", "vip")
    broker.enqueue([envelope_for("resize_video", tags=tags) for _ in range(jobs)], now=T)
    claims = broker.claim(["default"], "w1", 30, limit=jobs, now=T)
    broker.ack([(claims[0], None)], now=T + 1)

    before = counter_calls(client)
    assert all(broker.ack([(c, None) for c in claims[1:]], now=T + 1))
    return counter_calls(client) - before


@pytest.fixture
def counted(redis_server: str) -> Iterator[tuple[RedisBroker, redis.Redis]]:
    """A broker of its own prefix, and a client to read the server's command counts."""
    with closing(connect(redis_server + "?prefix=counted")) as broker:
        assert isinstance(broker, RedisBroker)
        yield broker, redis.Redis.from_url(redis_server)
        broker.purge()


def test_an_ack_batch_writes_its_numbers_with_commands_that_do_not_grow_with_it(
    counted: tuple[RedisBroker, redis.Redis],
) -> None:
    small = counter_writes_for_an_ack_of(*counted, 10)
    large = counter_writes_for_an_ack_of(*counted, 100)
    # P:c 2 and P:h 3 (as before), the minute's 3, per tag 5 (succeeded, j:<job>, a run
    # bucket, rt, running), a SISMEMBER per tag, 1 EXPIRE
    assert small == large == 2 + 3 + 3 + 2 * 5 + 2 + 1


def counter_writes_for_a_claim_of(broker: RedisBroker, client: redis.Redis, jobs: int) -> int:
    """HINCRBY, SISMEMBER and EXPIRE commands a claim of `jobs` tagged jobs runs; they all
    waited 1 s, so they share one histogram bucket."""
    broker.purge()
    tags = ("edge-1", "vip")
    broker.enqueue([envelope_for("resize_video", tags=tags) for _ in range(jobs + 1)], now=T)
    broker.claim(["default"], "w1", 30, limit=1, now=T + 1)

    before = counter_calls(client)
    assert len(broker.claim(["default"], "w1", 30, limit=jobs, now=T + 1)) == jobs
    return counter_calls(client) - before


def test_a_claim_batch_writes_its_numbers_with_commands_that_do_not_grow_with_it(
    counted: tuple[RedisBroker, redis.Redis],
) -> None:
    small = counter_writes_for_a_claim_of(*counted, 10)
    large = counter_writes_for_a_claim_of(*counted, 200)
    # P:c 2 (queued -1, running +1), P:h 3 (a wait bucket, wc, wt), the paused check 1,
    # per tag 3 (a wait bucket, wt, running), a SISMEMBER per tag
    assert small == large == 2 + 3 + 1 + 2 * 3 + 2


# -- blocking waits ----------------------------------------------------------------------------


def test_an_idle_waiter_wakes_as_soon_as_a_job_is_enqueued(redis_server: str) -> None:
    with (
        closing(connect(redis_server + "?prefix=wake")) as worker,
        closing(connect(redis_server + "?prefix=wake")) as producer,
    ):
        worker.purge()
        worker.wait_for_work(["default"], 1.0)  # the first call subscribes and returns
        woke: list[float] = []
        waiter = threading.Thread(
            target=lambda: woke.append(_timed(lambda: worker.wait_for_work(["default"], 30.0))),
            daemon=True,
        )
        waiter.start()
        producer.enqueue([envelope_for("resize_video")])
        waiter.join(timeout=30)
        assert woke and woke[0] < 5.0, f"the waiter slept {woke} s: it did not block on a wake-up"
        assert len(worker.claim(["default"], "w1", 30, limit=1)) == 1
        worker.purge()


def _timed(work: Callable[[], object]) -> float:
    start = time.monotonic()
    work()
    return time.monotonic() - start


# -- restarts ----------------------------------------------------------------------------------


def test_a_restarted_redis_server_loses_no_accepted_job_and_the_broker_carries_on(
    tmp_path: Path, own_redis: list[RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisProcess(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "always")
    own_redis.append(server)
    server.start()
    accepted: list[str] = []
    with closing(connect(server.url + "?reconnect_s=60")) as broker:
        accepted += broker.enqueue([envelope_for("resize_video") for _ in range(300)])
        running = broker.claim(["default"], "w1", lease_s=600, limit=100)
        assert broker.ack([(c, "before") for c in running[:50]]) == [True] * 50
        caplog.set_level(logging.INFO, logger="backroom")
        server.stop()

        def produce() -> None:  # a producer that meets the outage: it waits, then succeeds
            for _ in range(10):
                accepted.extend(broker.enqueue([envelope_for("resize_video") for _ in range(20)]))

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        wait_until(
            lambda: any(r.levelno == logging.WARNING for r in caplog.records),
            deadline_s=20,
            what="the broker to notice that redis is gone",
        )
        broker.wait_for_work(["default"], 0.2)  # waiting through an outage does not raise
        server.start()
        producer.join(timeout=60)
        assert not producer.is_alive()
        assert len(accepted) == 300 + 200
        # the claims held through the restart are still valid
        assert broker.ack([(c, "after") for c in running[50:]]) == [True] * 50
        while claims := broker.claim(["default"], "w2", lease_s=600, limit=100):
            assert all(broker.ack([(c, "after") for c in claims]))
        records = broker.get_many(accepted)
        assert all(r is not None and r.state == State.SUCCEEDED for r in records)
        assert broker.stats().jobs["resize_video"].counts == {"succeeded": 500}
    warnings = [r for r in caplog.records if r.name == "backroom" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "lost the connection to redis" in warnings[0].getMessage()
    assert any("reconnected" in r.getMessage() for r in caplog.records)


BUSY_SCRIPT = """
local started = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - started[1]) * 1000000 + (now[2] - started[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


def test_a_redis_busy_running_a_long_script_delays_calls_but_fails_none(
    tmp_path: Path, own_redis: list[RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    # A long script (someone's, or a script frozen mid-run by SIGSTOP) makes redis answer
    # BUSY to everyone until it ends. Nothing was run, so the broker waits and tries again.
    server = RedisProcess(tmp_path / "busy", "--busy-reply-threshold", "50")
    own_redis.append(server)
    server.start()
    with closing(connect(server.url + "?reconnect_s=30")) as broker:
        done = broker.enqueue([envelope_for("resize_video")])
        spinner = threading.Thread(
            target=lambda: server.client().eval(BUSY_SCRIPT, 0, 1_500_000), daemon=True
        )
        spinner.start()
        probe = server.client()

        def busy() -> bool:
            try:
                probe.ping()
            except redis.exceptions.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        wait_until(busy, deadline_s=10, what="redis to answer BUSY")
        caplog.set_level(logging.INFO, logger="backroom")
        done += broker.enqueue([envelope_for("resize_video")])  # met BUSY, waited, went in
        claims = broker.claim(["default"], "w1", lease_s=60, limit=10)
        assert sorted(c.envelope.id for c in claims) == sorted(done)
        spinner.join(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot serve calls now (BUSY" in warnings[0], warnings


def test_an_unreachable_redis_fails_at_once_with_one_clear_error() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BrokerError, match=rf"redis at redis://127.0.0.1:{port}/0 is unreachable"):
        connect(f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/0?result_ttl=-5", "result_ttl must be a positive number"),
        ("redis://127.0.0.1:6379/0?prefix=", "prefix must be a non-empty name"),
        ("redis://127.0.0.1:notaport/0", "is not a Redis URL"),
        ("redis+sentinel://127.0.0.1:26379/", "names no sentinel service"),
        ("redis+sentinel://127.0.0.1:x/mymaster", "bad sentinel address"),
    ],
)
def test_a_bad_redis_url_names_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        connect(url)


# -- sentinel ----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_sentinel_url_finds_the_master_and_follows_a_failover(
    tmp_path: Path, own_redis: list[RedisProcess]
) -> None:
    master = RedisProcess(tmp_path / "master")
    replica = RedisProcess(tmp_path / "replica")
    own_redis += [master, replica]
    master.start()
    replica.start("--replicaof", "127.0.0.1", str(master.port))
    sentinel = RedisProcess(tmp_path / "sentinel")
    conf = sentinel.workdir / "sentinel.conf"
    conf.write_text(
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 3000\n"
    )
    own_redis.append(sentinel)
    sentinel.start(str(conf), "--sentinel")
    watcher = sentinel.client()

    def master_port() -> int:
        host_port = watcher.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster")
        return int(host_port[1])

    wait_until(
        lambda: watcher.execute_command("SENTINEL", "replicas", "mymaster"),
        deadline_s=30,
        what="the sentinel to discover the replica",
    )
    with closing(
        connect(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0?reconnect_s=90")
    ) as broker:
        [before] = broker.enqueue([envelope_for("resize_video")], now=T)
        assert master.client().hexists("{backroom}:j", before)
        master.client().execute_command("WAIT", 1, 5000)  # the replica has it too
        master.stop()  # the sentinel sees the master down and promotes the replica
        [after] = broker.enqueue([envelope_for("resize_video")], now=T + 1)  # waits it out
        assert master_port() == replica.port
        assert replica.client().hexists("{backroom}:j", after)
        claims = broker.claim(["default"], "w1", 30, limit=10, now=T + 2)
        assert sorted(c.id for c in claims) == sorted([before, after])


# -- TLS and ACL users -------------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (made with the openssl tool)."""
    exe = shutil.which("openssl") or pytest.fail("openssl not found on PATH")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([exe, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=backroom test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


def test_rediss_with_an_acl_user_limited_to_its_prefix(
    tmp_path: Path, own_redis: list[RedisProcess]
) -> None:
    ca, cert, key = _certificates(tmp_path / "tls")
    tls_port = free_port()
    server = RedisProcess(tmp_path / "redis", "--tls-port", str(tls_port),
                          "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                          "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")  # fmt: skip
    own_redis.append(server)
    server.start()
    server.client().execute_command(
        "ACL", "SETUSER", "billing-worker", "on", ">s3cret", "~{billing}:*", "&{billing}:*",
        "+@all",
    )  # fmt: skip
    base = f"rediss://billing-worker:%s@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}&prefix=%s"
    with closing(connect(base % ("s3cret", "billing"))) as broker:
        assert "s3cret" not in repr(broker)
        [job_id] = broker.enqueue([envelope_for("send_invoices")], now=T)
        broker.wait_for_work(["default"], 0.01)  # may subscribe to its channels
        [claim] = broker.claim(["default"], "w1", 30, limit=1, now=T)
        assert broker.ack([(claim, {"sent": 3})], now=T + 1) == [True]
        record = broker.get(job_id)
        assert record is not None and record.result == {"sent": 3}
    with pytest.raises(BrokerError, match="refused the credentials"):
        connect(base % ("wrong", "billing"))
    with (
        closing(connect(base % ("s3cret", "media"))) as other,
        pytest.raises(BrokerError, match="denied"),
    ):
        other.enqueue([envelope_for("resize_video")], now=T)


def test_a_plain_client_cannot_talk_to_the_tls_port(
    tmp_path: Path, own_redis: list[RedisProcess]
) -> None:
    ca, cert, key = _certificates(tmp_path / "tls")
    tls_port = free_port()
    server = RedisProcess(tmp_path / "redis", "--tls-port", str(tls_port),
                          "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                          "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")  # fmt: skip
    own_redis.append(server)
    server.start()
    with pytest.raises(BrokerError):
        connect(f"rediss://127.0.0.1:{tls_port}/0")  # no CA given: the certificate is unknown


# -- the same answers as the reference broker ----------------------------------------------------


def test_claims_listings_and_counts_agree_with_the_sqlite_broker_step_by_step(
    redis_server: str, tmp_path: Path
) -> None:
    """Random work (enqueue with priorities, delays, tags and expiries; claims, outcomes,
    cancels, releases, retries, sweeps, pauses) applied to both brokers: every claim takes the
    same jobs in the same order, and every listing and count reads the same."""
    rng = random.Random(20330518)
    with (
        closing(connect(f"sqlite:///{tmp_path / 'reference.db'}")) as reference,
        closing(connect(redis_server + "?prefix=twin")) as twin,
    ):
        twin.purge()
        brokers = (reference, twin)
        running: dict[str, list[Claim]] = {}  # job id -> its claim on each broker
        ids: list[str] = []
        queries = [JobQuery(limit=7), JobQuery(state=State.QUEUED, limit=5),
                   JobQuery(job="send_email", limit=4), JobQuery(tag="edge-1", limit=6),
                   JobQuery(state=State.SUCCEEDED, job="resize_video", limit=3),
                   JobQuery(state=State.RUNNING, limit=50)]  # fmt: skip
        now = T
        for step in range(400):
            now += rng.choice([0.0, 0.5, 3.0])
            action = rng.random()
            if action < 0.35:
                batch = [
                    envelope_for(
                        rng.choice(["resize_video", "send_email"]),
                        queue=rng.choice(["default", "media"]),
                        priority=rng.choice([0, 0, 0, 5, -1]),
                        tags=tuple(rng.sample(["edge-1", "edge-2"], rng.randint(0, 2))),
                        eta=now + 5 if rng.random() < 0.15 else None,
                        expires=now + 8 if rng.random() < 0.1 else None,
                    )
                    for _ in range(rng.randint(1, 4))
                ]
                results = [b.enqueue(batch, now=now) for b in brokers]
                assert results[0] == results[1]
                ids += results[0]
            elif action < 0.55:
                queues = rng.choice([["default"], ["media", "default"], ["media"]])
                limit = rng.randint(1, 5)
                claims = [b.claim(queues, "w1", 10, limit, now=now) for b in brokers]
                assert [c.id for c in claims[0]] == [c.id for c in claims[1]], step
                for same in zip(*claims, strict=True):
                    running[same[0].id] = list(same)
            elif action < 0.75 and running:
                job_id = rng.choice(sorted(running))
                pair = running.pop(job_id)
                outcome = rng.random()
                for broker, claim in zip(brokers, pair, strict=True):
                    if outcome < 0.5:
                        broker.ack([(claim, {"n": step})], now=now)
                    elif outcome < 0.7:
                        broker.nack(claim, FAILURE, retry_at=now + 4, now=now)
                    elif outcome < 0.8:
                        broker.nack(claim, FAILURE, retry_at=None, now=now)
                    elif outcome < 0.9:
                        broker.release([claim], now=now)
                    else:
                        broker.reject(claim, "bad signature", now=now)
            elif action < 0.82 and ids:
                job_id = rng.choice(ids)
                assert len({b.cancel(job_id, now=now) for b in brokers}) == 1
            elif action < 0.87 and ids:
                job_id = rng.choice(ids)
                assert len({b.retry(job_id, now=now) for b in brokers}) == 1
            elif action < 0.93:
                moved = [b.promote_due(now=now) for b in brokers]
                assert moved[0] == moved[1]
                swept = [sorted(b.sweep_expired(now=now)) for b in brokers]
                assert swept[0] == swept[1]
                for job_id in swept[0]:
                    running.pop(job_id, None)
            elif action < 0.96:
                queue, pause = rng.choice(["media", "default"]), rng.random() < 0.5
                for broker in brokers:
                    (broker.pause if pause else broker.resume)(queue)
            for query in queries:
                pages = [[r.id for r in b.jobs(query)] for b in brokers]
                assert pages[0] == pages[1], (step, query)
            if ids and step % 10 == 0:
                cursor = JobQuery(limit=5, before=rng.choice(ids))
                pages = [[r.id for r in b.jobs(cursor)] for b in brokers]
                assert pages[0] == pages[1], (step, cursor)
                records = [b.get_many(ids) for b in brokers]
                states = [[None if r is None else (r.state, r.attempts) for r in rs]
                          for rs in records]  # fmt: skip
                assert states[0] == states[1], step
        stats = [b.stats(tags=True) for b in brokers]
        assert {j: dict(s.counts) for j, s in stats[0].jobs.items()} == {
            j: dict(s.counts) for j, s in stats[1].jobs.items()
        }
        assert dict(stats[0].queues) == dict(stats[1].queues)
        assert stats[0].tags == stats[1].tags and stats[0].tags
        assert brokers[0].timeline(T, now=now) == brokers[1].timeline(T, now=now)
        assert brokers[0].failure_groups(50) == brokers[1].failure_groups(50)
        twin.purge()


# -- other ways in, and calls repeated after a lost reply ----------------------------------------


def test_a_unix_socket_url_reaches_redis(tmp_path: Path, own_redis: list[RedisProcess]) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisProcess(tmp_path / "redis", "--unixsocket", str(socket_path))
    own_redis.append(server)
    server.start()
    with closing(connect(f"unix://{socket_path}?db=0&prefix=local")) as broker:
        [job_id] = broker.enqueue([envelope_for("resize_video")], now=T)
        assert [c.id for c in broker.claim(["default"], "w1", 30, limit=5, now=T)] == [job_id]
    assert server.client().hexists("{local}:j", job_id)


def test_an_enqueue_or_ack_repeated_after_a_lost_reply_counts_once(
    redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnect policy repeats a call whose reply was lost; the first may have run."""
    with closing(connect(redis_server + "?prefix=again")) as broker:
        broker.purge()
        envelope = envelope_for("resize_video")
        assert broker.enqueue([envelope], now=T) == [envelope.id]
        assert broker.enqueue([envelope], now=T) == [envelope.id]  # the very same envelope
        with pytest.raises(BrokerError, match="already stored"):
            broker.enqueue([envelope_for("send_email", id=envelope.id)], now=T)
        [claim] = broker.claim(["default"], "w1", 30, limit=5, now=T)
        monkeypatch.setattr("backroom.brokers.redis._call_id", lambda: "one-call")
        assert broker.ack([(claim, "done")], now=T + 1) == [True]
        assert broker.ack([(claim, "done")], now=T + 1) == [True]  # the same call, repeated
        monkeypatch.setattr("backroom.brokers.redis._call_id", lambda: "another-call")
        assert broker.ack([(claim, "done")], now=T + 2) == [False]  # a second call is refused
        assert broker.stats().jobs["resize_video"].counts == {"succeeded": 1}
        broker.purge()
