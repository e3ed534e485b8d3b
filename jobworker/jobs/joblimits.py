"""Which resource limits a job runs under: what it asked for, else the daemon's default,
never above the daemon's maximum (a request above it is refused, naming the maximum)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobworker.wire.errors import BadRequest

#: The limits, in the order records and messages name them.
NAMES = ("memory", "cpu", "pids", "io_read", "io_write")
#: Those counted in bytes (a refusal names the maximum in bytes).
_BYTES = ("memory", "io_read", "io_write")


@dataclass(frozen=True)
class JobLimits:
    """memory in bytes, cpu in cores (0.5: half of one CPU's time), pids in processes,
    io_read and io_write in bytes per second; None: unlimited."""

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    io_read: int | None = None
    io_write: int | None = None

    @property
    def io(self) -> bool:
        """Whether the job's disk bandwidth is limited."""
        return self.io_read is not None or self.io_write is not None

    def __bool__(self) -> bool:
        return any(getattr(self, n) is not None for n in NAMES)

    def wire(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in NAMES}


@dataclass(frozen=True)
class LimitPolicy:
    """``--default-memory``/``--max-memory`` and the same for cpu, pids, io-read and
    io-write."""

    defaults: JobLimits = JobLimits()
    maxima: JobLimits = JobLimits()

    def __post_init__(self) -> None:
        for n in NAMES:
            default, most = getattr(self.defaults, n), getattr(self.maxima, n)
            if default is not None and most is not None and default > most:
                raise ValueError(f"the default {n} limit is above the maximum")

    def resolve(self, memory: int | None = None, cpu: float | None = None,
                pids: int | None = None, io_read: int | None = None,
                io_write: int | None = None) -> JobLimits:
        """The limits for a start that asked for these; L{BadRequest} naming the maximum
        for a request above it."""
        asked = {"memory": memory, "cpu": cpu, "pids": pids, "io_read": io_read,
                 "io_write": io_write}
        chosen: dict[str, Any] = {}
        for n in NAMES:
            value, most = asked[n], getattr(self.maxima, n)
            if value is not None and most is not None and value > most:
                raise BadRequest(f"'{n}' is above this daemon's maximum of {most}"
                                 f"{' bytes' if n in _BYTES else ''}"
                                 f"{' per second' if n.startswith('io_') else ''}")
            if value is None:
                value = getattr(self.defaults, n)
                if value is None:
                    value = most  # no default: the maximum, if any, still applies
            chosen[n] = value
        return JobLimits(**chosen)


__all__ = ["NAMES", "JobLimits", "LimitPolicy"]
