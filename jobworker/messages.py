"""Frozen record types shared by daemon and client: what a job looks like on the wire."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

# Job states.  ``lost``: the daemon can no longer account for the job's end (its exit
# status was taken elsewhere; later, a job a restarted daemon cannot re-adopt).
RUNNING = "running"
EXITED = "exited"
STOPPED = "stopped"
FAILED = "failed"
LOST = "lost"
STATES = (RUNNING, EXITED, STOPPED, FAILED, LOST)
ENDED_STATES = (EXITED, STOPPED, FAILED, LOST)


@dataclass(frozen=True)
class JobRecord:
    """One job as clients see it; ``to_wire`` is exactly what ``jwclient --json`` prints."""

    id: str
    pid: int | None
    command: str
    args: list[str]
    dir: str
    owner: str
    state: str
    exit_code: int | None
    signal: str | None
    error: str | None
    started_at: str
    ended_at: str | None
    log_dir: str
    timed_out: bool = False
    timeout: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies recursively and costs ~15 us per record.
        return {f: getattr(self, f) for f in _FIELDS} | {"args": list(self.args)}

    @classmethod
    def from_wire(cls, value: Any) -> JobRecord:
        """Build from a decoded map, ignoring fields a newer daemon may add."""
        if not isinstance(value, dict):
            raise ValueError("job record must be a map")
        return cls(**{k: v for k, v in value.items() if k in _FIELD_SET})

    def exit_status(self) -> int:
        """The shell-style status: exit code, or 128+N when killed by signal N."""
        import signal as _signal

        if self.exit_code is not None:
            return self.exit_code
        if self.signal:
            try:
                return 128 + int(_signal.Signals[self.signal])
            except KeyError:
                return 128
        return 1


_FIELDS = tuple(f.name for f in fields(JobRecord))
_FIELD_SET = frozenset(_FIELDS)


class UTCStamp:
    """``datetime.fromtimestamp(when, UTC).strftime(seconds_format + ".%fZ")``, exactly, at a
    fraction of the cost: the whole second is formatted once and reused while it lasts (a
    job's start, its records and the audit line all fall in the same second), and only the
    microseconds are appended per call.

    The split into second and microseconds is the one datetime does (``modf``, then the
    fraction rounded half-even to whole microseconds, carried into the second at 10^6).
    """

    __slots__ = ("_seconds_format", "_cached")

    def __init__(self, seconds_format: str) -> None:
        self._seconds_format = seconds_format
        # (second, its formatted text): one tuple, so a reader in another thread never sees
        # one without the other.
        self._cached: tuple[int, str] = (0, datetime.fromtimestamp(0, UTC).strftime(seconds_format))

    def __call__(self, when: float) -> str:
        fraction, whole = math.modf(when)
        micros = round(fraction * 1e6)
        second = int(whole)
        if micros >= 1_000_000:
            second += 1
            micros -= 1_000_000
        elif micros < 0:
            second -= 1
            micros += 1_000_000
        cached = self._cached
        if cached[0] != second:
            cached = (second, datetime.fromtimestamp(second, UTC).strftime(self._seconds_format))
            self._cached = cached
        return f"{cached[1]}.{micros:06d}Z"


_iso8601 = UTCStamp("%Y-%m-%dT%H:%M:%S")


def iso8601(timestamp: float) -> str:
    """UTC ISO 8601 with microseconds and a trailing Z, as every record and log line uses."""
    return _iso8601(timestamp)
