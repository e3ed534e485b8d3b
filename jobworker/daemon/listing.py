"""Streaming a ``list`` reply: records newest first in chunk frames, read from the job
table a page at a time and sent only while the connection's transport takes them, so a list
of any length costs the daemon one page of records per connection, not the whole reply."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from twisted.internet.defer import Deferred

from jobworker.daemon.call import Call
from jobworker.daemon.stream import ReplyStream
from jobworker.jobs.store import ListQuery, Page
from jobworker.wire.codec import Encoded, array_head

#: Most records, and most encoded bytes of them, in one chunk frame.  The bytes bound
#: matters: a record can be ~64 KiB (a start request's arguments), and 500 of those would
#: make a frame over the client's 1 MiB limit.
LIST_BATCH = 500
LIST_BATCH_BYTES = 256 * 1024
#: Records read from the table at once: what one listing holds in memory at most.
LIST_PAGE = 500


class ListStream(ReplyStream):
    """A push producer behind the connection (``StreamFanout``) that reads pages of
    ``query`` through ``fetch`` and sends their records in batches, ``limit`` records at
    most (None: all); its Deferred fires with (records sent, the cursor past them or None
    when nothing more matches) once all are sent."""

    def __init__(self, call: Call, fetch: Callable[[ListQuery], Page], query: ListQuery,
                 limit: int | None) -> None:
        super().__init__(call)
        self._fetch = fetch
        self._query = query
        self._left = limit
        self._records: list[Encoded] = []
        self._next = 0
        self._cursor: int | None = None
        self._exhausted = False
        self._count = 0
        self._done: Deferred[tuple[int, int | None]] = Deferred(lambda _: self._close())

    def start(self) -> Deferred[tuple[int, int | None]]:
        self._call.streams.add(self)
        self._pump()
        return self._done

    def _send_next(self) -> bool:
        if self._next >= len(self._records) and not self._read_page():
            self._close()
            self._done.callback((self._count, self._cursor))
            return False
        self._call.send_chunk(self._batch())
        return True

    def _read_page(self) -> bool:
        """The next page into the buffer; False once there is no more to send."""
        if self._exhausted or self._left == 0:
            return False
        size = LIST_PAGE if self._left is None else min(LIST_PAGE, self._left)
        page = self._fetch(replace(self._query, limit=size, before=self._cursor
                                   if self._cursor is not None else self._query.before))
        self._records, self._next = page.records, 0
        self._cursor = page.next
        self._exhausted = page.next is None
        if self._left is not None:
            self._left -= len(page.records)
        return bool(page.records)

    def _batch(self) -> Encoded:
        """The next run of at most LIST_BATCH records and LIST_BATCH_BYTES (never empty:
        one record over the bytes bound still goes, alone)."""
        batch: list[bytes] = []
        size = 0
        records = self._records
        while self._next < len(records) and len(batch) < LIST_BATCH:
            record = records[self._next]
            if batch and size + len(record) > LIST_BATCH_BYTES:
                break
            batch.append(record)
            size += len(record)
            self._next += 1
        self._count += len(batch)
        return Encoded(array_head(len(batch)) + b"".join(batch))
