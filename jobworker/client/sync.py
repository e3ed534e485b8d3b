"""``jobworker.client.Client``: the synchronous Python API, and what ``jwclient`` runs on.

Methods block until their answer; iterators (``list``, ``logs``, ``follow``) yield as the
daemon streams; ``start_many`` and ``wait_many`` pipeline many requests on the one
connection.  Errors are the wire layer's typed exceptions (``NotFound``, ``Forbidden``, …)
and ``ClientError`` for a daemon that cannot be reached (docs/api.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from jobworker.client.endpoint import DEFAULT_SERVER, ClientConfig, ClientError
from jobworker.client.session import Session
from jobworker.wire import codec
from jobworker.wire.errors import ConnectionLost, JobWorkerError, UnknownMethod, error_from_wire
from jobworker.wire.record import JobRecord

#: Requests ``start_many`` and ``wait_many`` keep in flight: the daemon takes 256.
IN_FLIGHT = 128
#: Starts sent in one ``start_many`` request: the daemon's most (``wire.params.START_MANY``,
#: not imported here: the schema module costs jwclient ~10 ms of start-up), and about the
#: most bytes of them: under the daemon's default 64 KiB --max-frame.
START_MANY = 256
START_BYTES = 48 * 1024

JobRef = str | int
#: The builtin, for annotations inside Client, whose ``list`` method shadows it.
_list = list


def start_params(command: str, args: Sequence[str] = (), **options: Any) -> dict[str, Any]:
    """The ``start`` request for ``command``: every option that is not None (``env``,
    ``dir``, ``timeout``, ``request_id``, ``user``, ``isolate``, ``memory``, ``cpu``,
    ``pids``, and whatever the daemon adds) goes as it is; empty lists are left out."""
    params: dict[str, Any] = {"command": command, "args": list(args)}
    for name, value in options.items():
        if value is not None and value != []:
            params[name] = value
    return params


def _config(server: str | ClientConfig, pki: str | None, identity: str | None,
            ca: str | None, cert: str | None, key: str | None) -> ClientConfig:
    if isinstance(server, ClientConfig):
        return server
    if pki is not None and identity is not None:
        base = ClientConfig.from_pki(server, pki, identity)
        return ClientConfig(server, ca or base.ca, cert or base.cert, key or base.key)
    if ca is None or cert is None or key is None:
        raise ClientError("give pki and identity, or ca, cert and key")
    return ClientConfig(server, ca, cert, key)


class LogStream:
    """The bytes of one log stream, as an iterator; once it is exhausted, ``offset`` is
    where a resumed read starts and ``record`` the job's record."""

    def __init__(self, session: Session, params: dict[str, Any]) -> None:
        self._session = session
        self._chunks: deque[bytes] = deque()
        self._rid = session.send("logs", params, self._chunk)
        self.offset: int = params["offset"]
        self.record: JobRecord | None = None
        self._abandoned = False

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, bytes):
            raise ConnectionLost("server sent a log chunk that is not bytes")
        if not self._abandoned:
            self._chunks.append(chunk)

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                while self._chunks:
                    chunk = self._chunks.popleft()
                    self.offset += len(chunk)
                    yield chunk
                if self._session.done(self._rid):
                    break
                self._session.read_frame()
        except GeneratorExit:
            # Left before the end: what the stream still sends is dropped, not kept.
            self._abandoned = True
            self._chunks.clear()
            raise
        final = self._session.take(self._rid)
        if isinstance(final, dict):
            self.offset = final.get("offset", self.offset)
            if isinstance(final.get("record"), dict):
                self.record = JobRecord.from_wire(final["record"])


class Client:
    """A session with one daemon: ``with Client(server, pki=DIR, identity=NAME) as c:``.

    Connects (TLS 1.3 and hello) when made; raises ``ClientError`` if it cannot.
    """

    def __init__(self, server: str | ClientConfig = DEFAULT_SERVER, *, pki: str | None = None,
                 identity: str | None = None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 10.0) -> None:
        self.config = _config(server, pki, identity, ca, cert, key)
        self.timeout = timeout
        self.session = Session.open(self.config, timeout)

    @property
    def server_info(self) -> dict[str, Any]:
        """The daemon's hello: ``version``, ``server``, ``max_frame``."""
        return self.session.info

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Any method, by name: its result, or its error raised."""
        return self.session.call(method, params)

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("whoami")
        return result

    def start(self, command: str, args: Sequence[str] = (), **options: Any) -> JobRecord:
        """Start ``command`` (never through a shell); options as ``start_params``.  A job
        that cannot start is still a record, in state ``failed`` with its ``error``.
        A retry with the same ``request_id`` returns the same job and runs nothing twice."""
        return JobRecord.from_wire(self.call("start", start_params(command, args, **options)))

    def stop(self, job: JobRef, grace: float | None = None) -> JobRecord:
        """SIGTERM to the job's group, SIGKILL after ``grace``; returns once it has ended."""
        params: dict[str, Any] = {"job": job}
        if grace is not None:
            params["grace"] = grace
        return JobRecord.from_wire(self.call("stop", params))

    def status(self, job: JobRef) -> JobRecord:
        return JobRecord.from_wire(self.call("status", {"job": job}))

    def wait(self, job: JobRef) -> JobRecord:
        """The job's final record, once it has ended."""
        return JobRecord.from_wire(self.call("wait", {"job": job}))

    def forget(self, job: JobRef) -> dict[str, Any]:
        """Remove an ended job: its record and its logs."""
        result: dict[str, Any] = self.call("forget", {"job": job})
        return result

    def list_page(self, *, running: bool = False, **filters: Any
                  ) -> tuple[_list[JobRecord], str | None]:
        """One ``list`` reply (``limit``, ``cursor``, ``state``, ``owner``, ``since``,
        ``until``): its records, newest first, and the cursor of the next page (None:
        the last)."""
        records: _list[JobRecord] = []
        params = {"running": running, **{k: v for k, v in filters.items() if v is not None}}
        final = self.session.call("list", params, lambda batch: records.extend(
            JobRecord.from_wire(r) for r in batch))
        cursor = final.get("next_cursor") if isinstance(final, dict) else None
        return records, cursor if isinstance(cursor, str) else None

    def list(self, *, running: bool = False, **filters: Any) -> Iterator[JobRecord]:
        """Every job that matches, newest first, page after page."""
        cursor = filters.pop("cursor", None)
        while True:
            page, cursor = self.list_page(running=running, cursor=cursor, **filters)
            yield from page
            if cursor is None:
                return

    def logs(self, job: JobRef, stream: str = "stdout", offset: int = 0,
             follow: bool = False) -> LogStream:
        """A job's log from ``offset``: what it holds now, or (``follow``) everything
        until the job has ended."""
        return LogStream(self.session, {"job": job, "stream": stream, "offset": offset,
                                        "follow": follow})

    def follow(self, job: JobRef, stream: str = "stdout", offset: int = 0) -> LogStream:
        return self.logs(job, stream, offset, follow=True)

    def logs_to(self, job: JobRef, sinks: dict[str, Callable[[bytes], None]],
                offset: int = 0, follow: bool = False) -> dict[str, Any]:
        """Several streams of one job at once (``{"stdout": write, "stderr": write}``),
        each chunk to its sink as it comes; the last stream's final reply."""
        rids = []
        for stream, sink in sinks.items():
            rids.append(self.session.send(
                "logs", {"job": job, "stream": stream, "offset": offset, "follow": follow},
                _bytes_to(sink)))
        final: Any = None
        for rid in rids:
            self.session.wait_for(rid)
            final = self.session.take(rid)
        return final if isinstance(final, dict) else {}

    def start_many(self, requests: Iterable[dict[str, Any]]
                   ) -> _list[JobRecord | JobWorkerError]:
        """Start many jobs: ``requests`` are ``start_params`` maps, sent up to 256 in one
        ``start_many`` request (one commit on the daemon covers them), those requests
        pipelined; the results in the same order, each a record or the error its start
        met."""
        starts = list(requests)
        chunks = _chunks(starts)
        replies = self._many("start_many", [{"jobs": c} for c in chunks], None,
                             parse=_started)
        if replies and isinstance(replies[0], UnknownMethod):  # a daemon before start_many
            return self._many("start", starts, None)
        results: _list[JobRecord | JobWorkerError] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            results.extend([reply] * len(chunk) if isinstance(reply, JobWorkerError)
                           else reply)
        return results

    def wait_many(self, jobs: Sequence[JobRef],
                  on_ended: Callable[[int, JobRecord], None] | None = None,
                  tick: Callable[[], None] | None = None, interval: float = 0.25
                  ) -> _list[JobRecord | JobWorkerError]:
        """Wait for many jobs on one connection; ``on_ended(index, record)`` as each ends
        (in whatever order), ``tick()`` every ``interval`` seconds meanwhile."""
        return self._many("wait", [{"job": j} for j in jobs], on_ended, tick, interval)

    def _many(self, method: str, params: _list[dict[str, Any]],
              on_done: Callable[[int, JobRecord], None] | None,
              tick: Callable[[], None] | None = None, interval: float = 0.25,
              parse: Callable[[Any], Any] = JobRecord.from_wire) -> _list[Any]:
        results: _list[Any] = [None] * len(params)
        flying: dict[int, int] = {}  # request id -> index
        queued: Iterator[tuple[int, dict[str, Any]]] = iter(enumerate(params))
        more = True
        next_tick = time.monotonic() + interval
        while more or flying:
            while more and len(flying) < IN_FLIGHT:
                item = next(queued, None)
                if item is None:
                    more = False
                    break
                flying[self.session.send(method, item[1])] = item[0]
            if not flying:
                break
            if tick is None:
                self.session.read_frame()
            else:
                self.session.read_frame(max(0.0, next_tick - time.monotonic()))
                if time.monotonic() >= next_tick:
                    tick()
                    next_tick = time.monotonic() + interval
            for rid in [r for r in flying if self.session.done(r)]:
                index = flying.pop(rid)
                try:
                    record = parse(self.session.take(rid))
                except JobWorkerError as e:
                    results[index] = e
                    continue
                results[index] = record
                if on_done is not None:
                    on_done(index, record)
        return [r if r is not None else ConnectionLost("no reply") for r in results]


def _bytes_to(sink: Callable[[bytes], None]) -> Callable[[Any], None]:
    def on_chunk(chunk: Any) -> None:
        if not isinstance(chunk, bytes):
            raise ConnectionLost("server sent a log chunk that is not bytes")
        sink(chunk)

    return on_chunk


def _chunks(starts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``starts`` cut into ``start_many`` requests under the daemon's limits."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for start in starts:
        one = len(codec.encode(start))
        if chunks[-1] and (len(chunks[-1]) >= START_MANY or size + one > START_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(start)
        size += one
    return chunks if chunks[0] else []


def _started(reply: Any) -> list[JobRecord | JobWorkerError]:
    """``start_many``'s reply: each start's record, or its error."""
    try:
        return [JobRecord.from_wire(r) if "state" in r
                else error_from_wire(r["error"]["code"], r["error"]["message"])
                for r in reply["jobs"]]
    except (KeyError, TypeError) as e:
        raise ConnectionLost(f"server sent a malformed start_many reply ({e!r})") from None
