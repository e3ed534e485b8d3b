"""A reserve of free space on the state filesystem: new starts are refused before the disk
is full, so that stops, job ends and their audit lines still find room."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from jobworker.wire.errors import Unavailable

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class MinFree:
    """``--min-free``: a size in bytes, or a percentage of the file system."""

    text: str
    bytes: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> MinFree:
        """``0``, ``512M``, ``1G``, ``5%``; ValueError with the reason otherwise."""
        value = text.strip().upper().removesuffix("B").removesuffix("I")
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                return cls(text, percent=percent)
            number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "")
            size = int(float(number) * _UNITS[unit])
        except (ValueError, IndexError, KeyError):
            raise ValueError(f"bad size {text!r}: use a size such as 512M or 1G, "
                             "or a percentage such as 5%") from None
        if size < 0:
            raise ValueError(f"bad size {text!r}: it must not be negative")
        return cls(text, bytes=size)

    def required(self, total: int) -> int:
        """Bytes that must stay free on a file system of ``total`` bytes."""
        return max(self.bytes, int(total * self.percent / 100))


class DiskReserve:
    """Refuses (``check``) while the file system holding ``path`` has less free space than
    ``min_free``.  Looked at no more than once per ``interval`` seconds of ``clock``: a
    start costs no ``statvfs`` of its own."""

    def __init__(self, path: str, min_free: MinFree, clock: Callable[[], float],
                 interval: float = 0.25,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self._path = path
        self._min_free = min_free
        self._clock = clock
        self._interval = interval
        self._statvfs = statvfs
        self._checked = -interval
        self._short: str | None = None

    def check(self) -> None:
        """Raise L{Unavailable} while the reserve is not there."""
        now = self._clock()
        if now - self._checked >= self._interval:
            self._checked = now
            self._short = self._look()
        if self._short is not None:
            raise Unavailable(self._short)

    def _look(self) -> str | None:
        try:
            st = self._statvfs(self._path)
        except OSError:
            return None  # the start itself will say what is wrong with the path
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        required = self._min_free.required(total)
        if free >= required and (required == 0 or free > 0):
            return None
        return (f"the state file system has {_size(free)} free, under --min-free "
                f"{self._min_free.text} ({_size(required)}): new jobs are refused")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
