"""UTC timestamps as every record, log line and log directory name writes them."""

from __future__ import annotations

import math
from datetime import UTC, datetime


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
