"""backroom: background jobs for Python applications. One shared worker runs every job of an
app; each job travels in one envelope (name, source, payload, tags) and is checked, run and
reported by name. SQLite embedded by default, Redis for many machines."""

from backroom.app import App, Context, Handle
from backroom.envelope import Envelope, State
from backroom.errors import (
    BackroomError,
    BadEnvelope,
    BrokerError,
    CheckFailed,
    ConfigError,
    InvalidPayload,
    JobFailed,
    JobNotFound,
    JobTimeout,
    LeaseExpired,
    PayloadTooLarge,
    ResultTimeout,
    SourceNotAllowed,
    UnknownJob,
    WorkerCrashed,
)
from backroom.security import BadSignature

__all__ = [
    "App",
    "BackroomError",
    "BadEnvelope",
    "BadSignature",
    "BrokerError",
    "CheckFailed",
    "ConfigError",
    "Context",
    "Envelope",
    "Handle",
    "InvalidPayload",
    "JobFailed",
    "JobNotFound",
    "JobTimeout",
    "LeaseExpired",
    "PayloadTooLarge",
    "ResultTimeout",
    "SourceNotAllowed",
    "State",
    "UnknownJob",
    "WorkerCrashed",
]
