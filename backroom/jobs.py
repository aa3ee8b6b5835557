"""JobSpec: one registered job (its function, payload model built from type hints, sources,
retries, timeout, queue, tags) and the checks run on an envelope at enqueue and in the worker."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic

from backroom.errors import ConfigError, InvalidPayload, SourceNotAllowed, UnknownJob

JobFunction = Callable[..., Any]
Backoff = float | Callable[[int], float]

MAX_BACKOFF_S = 600.0


@dataclass(frozen=True)
class JobSpec:
    """A job as the registry knows it. `model` checks payloads; `takes_context` says whether the
    function's first parameter receives the Context."""

    name: str
    function: JobFunction
    model: type[pydantic.BaseModel]
    takes_context: bool
    is_async: bool
    sources: frozenset[str] | None = None  # None: any source may schedule it
    retries: int = 3
    retry_backoff: Backoff = 1.0
    timeout: float | None = None
    queue: str = "default"
    priority: int = 0
    tags: tuple[str, ...] = ()
    description: str = ""
    parameters: tuple[str, ...] = field(default=())

    def check_source(self, source: str) -> None:
        """Raise SourceNotAllowed when this job restricts its sources and `source` is not one."""
        if self.sources is not None and source not in self.sources:
            raise SourceNotAllowed(self.name, source, self.sources)

    def validate(self, payload: object) -> pydantic.BaseModel:
        """Check a payload against the type hints; InvalidPayload names the first bad field."""
        if type(payload) is not dict:  # a dict is read as is (validation never changes it)
            if not isinstance(payload, Mapping):
                raise InvalidPayload(
                    self.name, None, f"expects a JSON object, got {_describe(payload)}"
                )
            payload = dict(payload)
        try:  # what model_validate calls, without its wrapper: this runs on every enqueue
            model: pydantic.BaseModel = self.model.__pydantic_validator__.validate_python(payload)
            return model
        except pydantic.ValidationError as exc:
            raise _invalid(self.name, exc) from None

    def check(self, payload: object) -> None:
        """`validate` for a caller that needs no converted payload (the producer). A job without
        parameters has a model without fields or validators, which accepts an empty dict and
        nothing else: that one needs no model built."""
        if self.parameters or type(payload) is not dict or payload:
            self.validate(payload)

    def arguments(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments to call the function with: the payload, validated and converted."""
        model = self.validate(payload)
        return {name: getattr(model, name) for name in self.parameters}

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based): doubling with full jitter
        over its upper half, capped at ten minutes; or what a user-supplied callable says."""
        if callable(self.retry_backoff):
            return max(0.0, float(self.retry_backoff(attempt)))
        ceiling: float = min(MAX_BACKOFF_S, float(self.retry_backoff) * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.random() * ceiling / 2

    def schema(self) -> dict[str, Any]:
        """The payload's JSON Schema, built from the type hints."""
        return self.model.model_json_schema()

    def describe(self) -> dict[str, Any]:
        """The registry entry other producers read: queue, sources, retries, timeout, schema."""
        return {
            "name": self.name,
            "queue": self.queue,
            "sources": sorted(self.sources) if self.sources is not None else None,
            "retries": self.retries,
            "timeout": self.timeout,
            "priority": self.priority,
            "tags": list(self.tags),
            "async": self.is_async,
            "description": self.description,
            "payload_schema": self.schema(),
        }


def build_spec(function: JobFunction, name: str | None = None, **options: Any) -> JobSpec:
    """Read a function's signature and type hints into a JobSpec. The first parameter receives
    the Context when it is named `ctx`/`context` or annotated as Context; every other parameter
    is a payload field (keyword arguments; a default makes the field optional)."""
    job_name = name or function.__name__
    signature = inspect.signature(function)
    try:
        hints = get_type_hints(function)
    except Exception as exc:  # a hint naming something not importable
        raise ConfigError(f"job {job_name!r}: cannot read its type hints ({exc})") from None
    params = list(signature.parameters.values())
    takes_context = bool(params) and _is_context(params[0], hints)
    if takes_context:
        params = params[1:]
    fields: dict[str, Any] = {}
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ConfigError(
                f"job {job_name!r}: parameter {param.name!r} must be a plain or keyword "
                "parameter, since the payload is a JSON object of named fields"
            )
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model: type[pydantic.BaseModel] = pydantic.create_model(
        f"{job_name}_payload",
        __config__=pydantic.ConfigDict(extra="forbid", title=f"{job_name} payload"),
        **fields,
    )
    retries = int(options.get("retries", 3))
    if retries < 0:
        raise ConfigError(f"job {job_name!r}: retries must be 0 or more, got {retries}")
    sources = options.get("sources")
    return JobSpec(
        name=job_name,
        function=function,
        model=model,
        takes_context=takes_context,
        is_async=inspect.iscoroutinefunction(function),
        sources=frozenset([sources] if isinstance(sources, str) else sources)
        if sources is not None
        else None,
        retries=retries,
        retry_backoff=options.get("retry_backoff", 1.0),
        timeout=options.get("timeout"),
        queue=options.get("queue", "default"),
        priority=int(options.get("priority", 0)),
        tags=tuple(options.get("tags", ())),
        description=inspect.getdoc(function) or "",
        parameters=tuple(fields),
    )


class Registry:
    """The jobs one App runs, by name."""

    def __init__(self) -> None:
        self._specs: dict[str, JobSpec] = {}

    def add(self, spec: JobSpec) -> None:
        existing = self._specs.get(spec.name)
        if existing is not None and existing.function is not spec.function:
            raise ConfigError(f"job {spec.name!r} is registered twice; job names must be unique")
        self._specs[spec.name] = spec

    def get(self, name: str) -> JobSpec:
        """The spec for `name`; raises UnknownJob (with a did-you-mean hint) if there is none."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownJob(name, self._specs) from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Any:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def names(self) -> Iterable[str]:
        return sorted(self._specs)

    def queues(self) -> list[str]:
        return sorted({spec.queue for spec in self._specs.values()})


def _is_context(param: inspect.Parameter, hints: Mapping[str, Any]) -> bool:
    if param.name in ("ctx", "context"):
        return True
    hint = hints.get(param.name)
    return getattr(hint, "__name__", None) == "Context"


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _invalid(job: str, exc: pydantic.ValidationError) -> InvalidPayload:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or None
    kind = error["type"]
    if kind == "missing":
        return InvalidPayload(job, where, "is required but missing")
    if kind == "extra_forbidden":
        return InvalidPayload(job, where, "is not a parameter of this job")
    message = error["msg"]
    message = message[0].lower() + message[1:]
    message = message.replace("input should be", "expects")
    return InvalidPayload(job, where, f"{message}, got {_describe(error.get('input'))}")
