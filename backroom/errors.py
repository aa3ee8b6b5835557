"""Every error backroom raises. All derive from BackroomError; this module imports nothing else
from backroom, so any layer may raise them."""

from __future__ import annotations

from collections.abc import Iterable


class BackroomError(Exception):
    """The base of every backroom error: `except backroom.BackroomError` catches them all."""


class ConfigError(BackroomError):
    """Bad configuration: a broker URL, an --app path, an option out of range."""


class CheckFailed(BackroomError):
    """An envelope failed a check: raised at enqueue, or the reason a worker rejected a job.
    UnknownJob, SourceNotAllowed, InvalidPayload, PayloadTooLarge, BadEnvelope and
    BadSignature derive from it, so a hook can tell a rejection from a failed run."""


class UnknownJob(CheckFailed):
    def __init__(self, job: str, known: Iterable[str]) -> None:
        self.job, self.known = job, sorted(known)
        if not isinstance(job, str):  # the job's function, say, instead of its name
            name = getattr(job, "__name__", None)
            hint = f"; pass its name, {name!r}" if name in self.known else ""
            super().__init__(f"a job is named by a string, got {type(job).__name__} {job!r}{hint}")
            return
        import difflib  # only for this message: a worker has no other use for it

        near = difflib.get_close_matches(job, self.known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        listed = ", ".join(self.known) or "none"
        super().__init__(f"unknown job {job!r}; this app registers: {listed}{hint}")


class SourceNotAllowed(CheckFailed):
    def __init__(self, job: str, source: str, allowed: Iterable[str]) -> None:
        self.job, self.source, self.allowed = job, source, sorted(allowed)
        allowed_text = ", ".join(self.allowed)
        super().__init__(
            f"source {source!r} may not schedule {job!r}; allowed sources: {allowed_text}"
        )


class InvalidPayload(CheckFailed):
    """The payload does not fit the job's type hints. `field` names the first offending field
    (dotted for nested ones), or is None when the payload as a whole is wrong."""

    def __init__(self, job: str, field: str | None, problem: str) -> None:
        self.job, self.field, self.problem = job, field, problem
        where = f"field {field!r} " if field else ""
        super().__init__(f"invalid payload for {job!r}: {where}{problem}")


class PayloadTooLarge(CheckFailed):
    def __init__(self, job: str, size: int, limit: int) -> None:
        self.job, self.size, self.limit = job, size, limit
        super().__init__(
            f"payload for {job!r} is {size} bytes, over the limit of {limit} bytes; "
            "store large data elsewhere and pass a reference"
        )


class BadEnvelope(CheckFailed):
    """Bytes in the broker that are not a valid envelope (truncated, not JSON, wrong fields)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"malformed envelope: {problem}")


class BrokerError(BackroomError):
    """The broker could not be reached or refused the operation."""


class JobNotFound(BackroomError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r} (it never existed, or its record expired)")


class JobFailed(BackroomError):
    """Raised by Handle.result() when the job ended dead, rejected or cancelled. Carries the
    remote error: its exception type, message and traceback."""

    def __init__(
        self, job_id: str, state: str, error_type: str, message: str, traceback: str = ""
    ) -> None:
        self.job_id, self.state = job_id, state
        self.error_type, self.message, self.traceback = error_type, message, traceback
        super().__init__(f"job {job_id} ended {state}: {error_type}: {message}")


class ResultTimeout(BackroomError, TimeoutError):
    """Handle.result(timeout=) ran out; `except TimeoutError` still catches it."""

    def __init__(self, job_id: str, timeout: float, state: str) -> None:
        self.job_id, self.timeout, self.state = job_id, timeout, state
        super().__init__(f"job {job_id} has no result after {timeout:g} s (it is {state})")


class JobTimeout(BackroomError, TimeoutError):
    """A job ran past its timeout; `except TimeoutError` still catches it."""


class LeaseExpired(BackroomError):
    """The worker running a job stopped renewing its lease (killed, frozen, cut off): the job
    went back to its queue, or ended dead when that attempt was its last."""


class WorkerCrashed(BackroomError):
    """The process running a job died (os._exit, a segfault, the OOM killer) before it ended."""
