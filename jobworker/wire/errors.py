"""Exceptions that cross the wire, and the one table mapping them to error codes."""

from __future__ import annotations


class JobWorkerError(Exception):
    """Base of every error a client may see; ``code`` is its stable wire name."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(JobWorkerError):
    """The frame could not be decoded, or a field has the wrong type or value."""

    code = "bad_request"


class FrameTooLarge(BadRequest):
    """A frame's length prefix is over the configured limit."""

    code = "frame_too_large"


class UnknownMethod(JobWorkerError):
    code = "unknown_method"


class UnsupportedVersion(JobWorkerError):
    """The peer speaks another protocol version, or skipped the hello."""

    code = "unsupported_version"


class NotFound(JobWorkerError):
    """No such job, or one the caller may not see (the two are indistinguishable)."""

    code = "not_found"


class Forbidden(JobWorkerError):
    code = "forbidden"


class Unavailable(JobWorkerError):
    """The daemon is shutting down or over a limit; retrying later may work."""

    code = "unavailable"


class ConnectionLost(JobWorkerError):
    """Client side: the connection closed before the reply arrived."""

    code = "connection_lost"


class Internal(JobWorkerError):
    """A bug in the daemon; details are in its log, never on the wire."""

    code = "internal"


ERRORS: dict[str, type[JobWorkerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        FrameTooLarge,
        UnknownMethod,
        UnsupportedVersion,
        NotFound,
        Forbidden,
        Unavailable,
        ConnectionLost,
        Internal,
    )
}


def error_from_wire(code: str, message: str) -> JobWorkerError:
    """Rebuild the exception a server sent; unknown codes keep their code."""
    cls = ERRORS.get(code)
    if cls is not None:
        return cls(message)
    err = JobWorkerError(message)
    err.code = code
    return err
