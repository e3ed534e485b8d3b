"""An ended job read back from the job table: what ``status``, ``wait``, ``logs`` and
``stop`` need of a job, without a process, timers or observers behind it."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from jobworker.wire.codec import Encoded, decode
from jobworker.wire.record import JobRecord


class StoredJob:
    """A finished job as the table keeps it: its record, encoded as clients receive it.

    Only ended jobs are served from the table (running ones stay in memory), so every
    question has its answer already: waiting and stopping return the record at once.
    """

    __slots__ = ("_packed", "_wire")

    ended = True

    def __init__(self, packed: bytes) -> None:
        self._packed = Encoded(packed)
        self._wire: dict[str, Any] = decode(packed)

    def __getattr__(self, name: str) -> Any:
        # id, owner, pid, state, log_dir...: the record's fields.
        try:
            return self._wire[name]
        except KeyError:
            raise AttributeError(name) from None

    def record(self) -> JobRecord:
        return JobRecord.from_wire(self._wire)

    def wire(self) -> dict[str, Any]:
        wire = dict(self._wire)
        wire["args"] = list(wire["args"])
        return wire

    def packed(self) -> Encoded:
        return self._packed

    def when_ended(self) -> Deferred[JobRecord]:
        return succeed(self.record())

    def stop(self, grace: float) -> Deferred[JobRecord]:
        return succeed(self.record())

    def settle(self) -> Deferred[None]:
        return succeed(None)

    def __repr__(self) -> str:
        return f"<StoredJob {self._wire.get('id')} state={self._wire.get('state')}>"
