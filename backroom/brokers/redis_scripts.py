"""What the Redis broker keeps and how: loading the Lua scripts (lua/*.lua, each prefixed with
lua/common.lua), and turning stored bytes into records and stats. No connection handling here."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import msgspec

from backroom.brokers.base import (
    BUCKET_BOUNDS,
    MAX_FAILURE_GROUPS,
    MAX_TAGS,
    TIMELINE_KEEP_MINUTES,
    Failure,
    FailureGroup,
    JobRecord,
    Stats,
    StatsBuilder,
    TimelinePoint,
    timeline_minutes,
    timeline_points,
)
from backroom.envelope import Envelope, State, decode

SCRIPTS = (
    "enqueue",
    "claim",
    "extend",
    "ack",
    "nack",
    "reject",
    "finish_cancelled",
    "release",
    "progress",
    "cancel",
    "retry",
    "delete",
    "promote",
    "sweep",
    "prune",
    "fire_once",
    "jobs",
    "withdraw",
    "resume",
)


# A finished record outlives its result ttl by a margin (a tenth of it, at least a minute), so
# the sweep that forgets it and what names it in the indexes runs first; Redis drops it by
# itself when no worker sweeps.
def expiry_margin_s(ttl_s: float) -> float:
    return max(60.0, ttl_s / 10)


DEFAULT_MAX_RETRIES = Envelope(id="", job="", source="").max_retries

_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder()
_json = msgspec.json.Encoder()


def lua_sources(result_ttl_s: float) -> dict[str, str]:
    """Every script's full text: common.lua with its constants filled in, then the script."""
    folder = resources.files("backroom.brokers").joinpath("lua")
    ttl = result_ttl_s
    common = (
        folder.joinpath("common.lua")
        .read_text(encoding="utf-8")
        .replace("__BOUNDS__", ", ".join(repr(bound) for bound in BUCKET_BOUNDS))
        .replace("__DEFAULT_RETRIES__", str(DEFAULT_MAX_RETRIES))
        .replace("__MAX_TAGS__", str(MAX_TAGS))
        .replace("__KEEP_MINUTES__", str(TIMELINE_KEEP_MINUTES))
        .replace("__MAX_FAILURE_GROUPS__", str(MAX_FAILURE_GROUPS))
        .replace("__TTL_MS__", str(int((ttl + expiry_margin_s(ttl)) * 1000)))
        .replace("__TTL_LONG_MS__", str(int((4 * ttl + expiry_margin_s(4 * ttl)) * 1000)))
    )
    sources = {}
    for name in SCRIPTS:
        body = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        sources[name] = _needed(common, body) + "\n" + body
    return sources


_DEFINITION = re.compile(
    r"^(?:local\s+function\s+(\w+)|local\s+([\w\s,]+?)\s*=|local\s+(\w+)\s*$|(\w+)\s*=\s*function)"
)
_WORD = re.compile(r"[A-Za-z_]\w*")


def _needed(common: str, body: str) -> str:
    """The part of common.lua a script uses: its top-level definitions (each runs on every
    call, and a closure costs time) that the script reaches, directly or through another."""
    blocks: list[tuple[set[str], str]] = []  # (names defined, text), in file order
    for line in common.splitlines(keepends=True):
        found = _DEFINITION.match(line)
        if found or not blocks:
            names = (
                {n.strip() for n in ",".join(g for g in found.groups() if g).split(",")}
                if found
                else set()
            )
            blocks.append((names, line))
        else:
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + line)
    wanted = set(_WORD.findall(_strip_comments(body)))
    keep = [not names for names, _ in blocks]  # the opening comment stays
    changed = True
    while changed:
        changed = False
        for i, (names, text) in enumerate(blocks):
            if not keep[i] and names & wanted:
                keep[i] = True
                wanted |= set(_WORD.findall(_strip_comments(text)))
                changed = True
    return "".join(text for (_, text), kept in zip(blocks, keep, strict=True) if kept)


def _strip_comments(lua: str) -> str:
    return re.sub(r"--[^\n]*", "", lua)


# -- envelopes: stored without their leading "id" member (the id is the hash field) ----------


def stored_envelope(envelope: Envelope) -> bytes:
    raw = envelope.encode()
    head = b'{"id":' + _json.encode(envelope.id) + b","
    return b"{" + raw[len(head) :] if raw.startswith(head) else raw


def restored_envelope(job_id: str, stored: bytes | str) -> Envelope:
    """Raises BadEnvelope when the stored bytes are not an envelope."""
    data = stored.encode() if isinstance(stored, str) else stored
    if not data.startswith(b'{"id"'):
        data = b'{"id":' + _json.encode(job_id) + b"," + data[1:]
    return decode(data)


def enqueue_row(envelope: Envelope, now: float) -> tuple[Any, ...]:
    """One envelope as enqueue.lua reads it: [id, envelope, job, queue, priority, due, meta];
    meta holds only what differs from the defaults, so a plain job's record stays small."""
    meta: dict[str, Any] = {}
    stored = stored_envelope(envelope)
    if not stored.startswith(b'{"job":'):  # not our own encoding: Lua could not read it back
        meta.update(j=envelope.job, q=envelope.queue, p=envelope.priority)
    if envelope.max_retries != DEFAULT_MAX_RETRIES:
        meta["mr"] = envelope.max_retries
    if envelope.expires is not None:
        meta["x"] = envelope.expires
    if envelope.unique_key is not None:
        meta["uk"] = envelope.unique_key
        if envelope.unique_for is not None:
            meta["uf"] = envelope.unique_for
    if envelope.tags:
        meta["tg"] = list(envelope.tags)
    if not envelope.created_at:
        meta["ca"] = now
    due = envelope.eta if envelope.eta is not None and envelope.eta > now else None
    return (
        envelope.id,
        stored.decode(errors="replace"),  # Lua's cmsgpack reads str, not bin
        envelope.job,
        envelope.queue,
        str(envelope.priority),
        due,
        meta or None,
    )


def pack(value: Any) -> bytes:
    """msgpack for the scripts' arguments (strings as str: Lua's cmsgpack has no bin type)."""
    return _packer.encode(value)


def unpack(data: bytes) -> Any:
    return _unpacker.decode(data)


# -- records ----------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def record_of(job_id: str, raw: bytes) -> JobRecord:
    """A stored record (msgpack: a fresh job's array, or any other job's map) as a JobRecord."""
    data = _unpacker.decode(raw)
    if isinstance(data, list):  # [seq, envelope, queued_at, meta?]: queued, never moved
        meta: Mapping[str, Any] = data[3] if len(data) > 3 and data[3] else {}
        env = _envelope_or_placeholder(job_id, data[1], meta)
        queued_at = float(data[2])
        return JobRecord(
            id=job_id,
            state=State.QUEUED,
            envelope=env.with_attempt(0),
            created_at=env.created_at or float(meta.get("ca", queued_at)),
            queued_at=queued_at,
        )
    attempts = int(data.get("a", 0))
    env = _envelope_or_placeholder(job_id, data.get("e", ""), data)
    error = data.get("er")
    result = data.get("r")
    return JobRecord(
        id=job_id,
        state=State(data["st"]),
        envelope=env.with_attempt(attempts),
        attempts=attempts,
        created_at=env.created_at or float(data.get("ca", 0.0)),
        queued_at=_float(data.get("qa")),
        started_at=_float(data.get("sa")),
        finished_at=_float(data.get("fa")),
        progress=_float(data.get("pg")),
        progress_message=data.get("pm"),
        result=None if result is None else msgspec.json.decode(result),
        error=None if not error else Failure(*(str(part) for part in error[:3])),
        reason=data.get("rs"),
        worker_id=data.get("w"),
        cancel_requested=bool(data.get("cr")),
    )


def _envelope_or_placeholder(job_id: str, stored: str, fields: Mapping[str, Any]) -> Envelope:
    try:
        return restored_envelope(job_id, stored)
    except Exception:  # a malformed envelope must not make its record unreadable
        return Envelope(
            id=job_id,
            job=str(fields.get("j", "?")),
            source="?",
            queue=str(fields.get("q", "default")),
        )


def running_state(raw: bytes | None) -> tuple[bool, bool]:
    """(running, cancel requested) of a live record."""
    if raw is None:
        return False, False
    data = _unpacker.decode(raw)
    if not isinstance(data, dict) or data.get("st") != "running":
        return False, False
    return True, bool(data.get("cr"))


# -- stats --------------------------------------------------------------------------------------


def stats_of(
    counts: Mapping[bytes, bytes],
    hist: Mapping[bytes, bytes],
    tags: Mapping[bytes, bytes] | None = None,
) -> Stats:
    """Stats from the P:c counters ("job\\0queue\\0state" -> n), the P:h histograms and, when
    read, the P:T per-tag counters ("tag\\0kind" -> n)."""
    stats = StatsBuilder()
    for field, value in (tags or {}).items():
        tag, _, kind = field.decode().partition("\0")
        stats.tag(tag, kind, int(value))
    timings: dict[tuple[str, str], dict[str, float]] = {}
    for field, value in counts.items():
        job, queue, state = field.decode().split("\0")
        if int(value):
            stats.count(job, queue, state, int(value))
    for field, value in hist.items():
        job, _, name = field.decode().partition("\0")
        kind = {"r": "run", "w": "wait"}.get(name[:1], "")
        if name == "retry":
            stats.event(job, "retry", int(value))
        elif name == "recovery":
            stats.event(job, "recovery", int(value))
        elif name.startswith("x:"):
            stats.event(job, f"reject:{name[2:]}", int(value))
        elif kind and name[1:2] == ":":
            stats.bucket(job, kind, int(name[2:]), int(value))
        elif kind and name[1:] == "c":
            timings.setdefault((job, kind), {})["count"] = int(value)
        elif kind and name[1:] in ("t", "m"):
            timings.setdefault((job, kind), {})[name[1:]] = int(value) / 1e6  # microseconds
    for (job, kind), timing in timings.items():
        stats.timing(job, kind, int(timing.get("count", 0)), timing.get("t", 0.0),
                     timing.get("m", 0.0))  # fmt: skip
    return stats.build()


def timeline_of(
    since: float, now: float, read: Callable[[Sequence[int]], Sequence[Mapping[bytes, bytes]]]
) -> list[TimelinePoint]:
    """The timeline from the P:m:<minute> hashes ("job\\0kind" -> n) of the minutes it covers,
    which `read` returns in the order given."""
    minutes = timeline_minutes(since, now)
    if not minutes:
        return []
    rows = []
    for minute, fields in zip(minutes, read(minutes), strict=True):
        for field, value in fields.items():
            job, _, kind = field.decode().rpartition("\0")
            rows.append((minute, job, kind, int(value)))
    return timeline_points(rows)


def failure_groups_of(groups: Mapping[bytes, bytes], limit: int) -> list[FailureGroup]:
    """The P:F hash ("job\\0type" -> msgpack [failures, dead, id, message, at]), most first."""
    found = []
    for field, raw in groups.items():
        job, _, error_type = field.decode().partition("\0")
        failures, dead, latest_id, message, at = _unpacker.decode(raw)
        found.append(FailureGroup(job, error_type, int(failures), int(dead), str(latest_id),
                                  str(message), float(at)))  # fmt: skip
    found.sort(key=lambda g: (-g.failures, g.job, g.type))
    return found[: max(0, limit)]
