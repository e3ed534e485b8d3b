"""Streaming a ``list`` reply: records newest first in chunk frames, sent only while the
connection's transport takes them, so a list of any length costs the daemon one chunk of
buffer per connection, not the whole reply."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred

from jobworker.daemon.call import Call
from jobworker.daemon.stream import ReplyStream
from jobworker.jobs.job import Job
from jobworker.wire.codec import Encoded, array_head

#: Most records, and most encoded bytes of them, in one chunk frame.  The bytes bound
#: matters: a record can be ~64 KiB (a start request's arguments), and 500 of those would
#: make a frame over the client's 1 MiB limit.
LIST_BATCH = 500
LIST_BATCH_BYTES = 256 * 1024


class ListStream(ReplyStream):
    """A push producer behind the connection (``StreamFanout``) that sends ``jobs``'
    records in batches; its Deferred fires with their count once all are sent."""

    def __init__(self, call: Call, jobs: Sequence[Job]) -> None:
        super().__init__(call)
        self._jobs = jobs
        self._next = 0
        self._done: Deferred[int] = Deferred(lambda _: self._close())

    def start(self) -> Deferred[int]:
        self._call.streams.add(self)
        self._pump()
        return self._done

    def _send_next(self) -> bool:
        if self._next >= len(self._jobs):
            self._close()
            self._done.callback(len(self._jobs))
            return False
        self._call.send_chunk(self._batch())
        return True

    def _batch(self) -> Encoded:
        """The next run of at most LIST_BATCH records and LIST_BATCH_BYTES (never empty:
        one record over the bytes bound still goes, alone)."""
        batch: list[bytes] = []
        size = 0
        jobs = self._jobs
        while self._next < len(jobs) and len(batch) < LIST_BATCH:
            record = jobs[self._next].packed()
            if batch and size + len(record) > LIST_BATCH_BYTES:
                break
            batch.append(record)
            size += len(record)
            self._next += 1
        return Encoded(array_head(len(batch)) + b"".join(batch))
