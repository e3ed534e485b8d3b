"""One handler per RPC method, each with its parameter schema.

Handlers receive parameters already validated by their schema
(``jobworker.wire.params``) and the caller already allowed to call the method; per-job
visibility is checked through ``JobAccess.visible_job``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from jobworker.daemon.access import JobAccess
from jobworker.daemon.call import Call
from jobworker.daemon.follow import LogStream
from jobworker.daemon.limits import Limits
from jobworker.daemon.listing import ListStream
from jobworker.daemon.metrics import Metrics
from jobworker.daemon.runas import RunAs
from jobworker.daemon.watcher import FileWatcher
from jobworker.jobs.credentials import Credentials
from jobworker.jobs.job import Job
from jobworker.jobs.logs import JobLogs
from jobworker.jobs.namespaces import NamespaceSupport
from jobworker.jobs.store import ListQuery
from jobworker.wire.codec import Encoded
from jobworker.wire.errors import BadRequest, Internal, JobWorkerError, Unavailable
from jobworker.wire.hello import check_version, hello_result
from jobworker.wire.params import SCHEMAS, start_digest
from jobworker.wire.record import FAILED, QUEUED, RUNNING, JobRecord
from jobworker.wire.schema import Schema

#: A handler returns its result, or a coroutine when it has to wait (stop, wait, logs).
Handler = Callable[[Call, dict[str, Any]], Any]
#: Method name -> its parameter schema and its handler.
Table = dict[str, tuple[Schema, Handler]]

log = Logger()


class Methods:
    """One handler per method."""

    def __init__(self, access: JobAccess, limits: Limits,
                 follower: FileWatcher | None, runas: RunAs,
                 namespaces: NamespaceSupport, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.runas = runas
        self.namespaces = namespaces
        self.access = access
        self.jobs = access.jobs
        self.authz = access.authz
        self.audit = access.audit
        self.limits = limits
        self.follower = follower
        # Log streams open now, by connection (its StreamFanout) and by identity.
        self._per_connection: dict[Any, int] = {}
        self._per_identity: dict[str, int] = {}

    def hello(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        check_version(p["version"])
        return hello_result(self.limits.max_frame)

    def whoami(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        me: dict[str, Any] = {"identity": call.who.name, "role": call.who.role}
        if call.who.role == "admin" and self.audit is not None:
            me["audit_failures"] = self.audit.failures
        return me

    def start(self, call: Call, p: dict[str, Any]) -> Any:
        """Audited twice: the decision before the job starts, its outcome after.  A start
        retried with its ``request_id`` gets the first one's job, and runs nothing.  With
        a durable table the job is committed before its program runs (a coroutine then)."""
        request = None
        if p["request_id"] is not None:
            request = (p["request_id"], start_digest(p))
            replay = self._replay(call, *request)
            if replay is not None:
                return replay
        if p["isolate"]:
            ready = self.namespaces.ready()  # raises BadRequest if this host cannot
            if ready is not None:
                return self._start_when_ready(ready, call, p, request)
        return self._start(call, p, request)

    async def start_many(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Each map of ``jobs`` is a ``start`` of its own (its schema, its audit lines),
        all admitted in this turn so that one commit covers them; the reply lists each
        one's record, or its error, in order.  What a batch file's ``submit`` sends: one
        request per job cost the daemon more than the job's admission itself."""
        schema = SCHEMAS["start"]
        started: list[Any] = []
        for item in p["jobs"]:
            try:
                one = self.start(call, schema.validate(item))
            except JobWorkerError as e:
                one = {"error": e.to_wire()}
            started.append(one if isinstance(one, dict) else ensureDeferred(one))
        results = []
        for one in started:
            if isinstance(one, dict):
                results.append(one)
                continue
            try:
                results.append(await one)
            except JobWorkerError as e:
                results.append({"error": e.to_wire()})
            except Exception:  # noqa: BLE001 (a bug: logged, the others still answered)
                log.failure("{event}", event="request.bug", method="start_many")
                results.append({"error": Internal("internal error").to_wire()})
        return {"jobs": results}

    async def _start_when_ready(self, ready: Deferred[None], call: Call, p: dict[str, Any],
                                request: tuple[str, bytes] | None) -> Any:
        """The first isolated start waits for the probe of what the host can do."""
        await ready
        if request is not None:  # a retry may have come and started it meanwhile
            replay = self._replay(call, *request)
            if replay is not None:
                return replay
        started = self._start(call, p, request)
        if isinstance(started, dict):
            return started
        return await started

    def _start(self, call: Call, p: dict[str, Any], request: tuple[str, bytes] | None
               ) -> Any:
        self.jobs.check_admission()
        # Each job it waits for must be one the caller may see: else the same not_found.
        after = [self.access.visible_job(call, ref) for ref in p["after"]]
        creds = self.runas.credentials(call.who.name, p["user"])
        job_id = self.jobs.new_id()
        self._audit(call, "start", job_id, "allowed", command=p["command"], args=p["args"],
                    **({"uid": creds.uid} if creds is not None else {}),
                    **({"isolate": p["isolate"]} if p["isolate"] else {}))
        # A job run as another user starts in its home ("/" for a dynamic uid), not in
        # the daemon's directory, which that user may not enter.
        workdir = p["dir"]
        if workdir is None and creds is not None:
            workdir = creds.home if os.path.isdir(creds.home) else "/"
        job = self.jobs.admit(owner=call.who.name, command=p["command"], args=p["args"],
                              dir=workdir, timeout=p["timeout"], job_id=job_id,
                              request=request, isolate=p["isolate"], memory=p["memory"],
                              cpu=p["cpu"], pids=p["pids"], io_read=p["io_read"],
                              io_write=p["io_write"], queue=p["queue"],
                              priority=p["priority"], role=call.who.role, env=p["env"],
                              creds=creds, after=after, name=p["name"],
                              labels=p["labels"])
        if job.state != RUNNING:
            # Queued (the manager launches it when a slot frees), or cancelled at once (a
            # job it waits for has failed): the reply, after the commit the server awaits,
            # is that record.
            self._audit(call, "start", job.id, job.state, queue=job.queue)
            return job.wire()
        pending = self.jobs.pending()
        if pending is None:
            return self._launch(call, job, p["env"], creds)
        # The launch hangs on the commit, not on this request: a caller that goes away
        # meanwhile (its request cancelled) must not leave a job admitted but never run.
        launched: Deferred[dict[str, Any]] = Deferred()

        def launch(_: object) -> None:
            try:
                record = self._launch(call, job, p["env"], creds)
            except Exception:  # noqa: BLE001 (handed to the caller, who logs it)
                if not launched.called:
                    launched.errback()
                return
            if not launched.called:
                launched.callback(record)

        pending.addBoth(launch)
        return _result(launched)

    def _launch(self, call: Call, job: Job, env: list[str], creds: Credentials | None
                ) -> dict[str, Any]:
        self.jobs.launch(job, env, creds)
        record = job.wire()
        self._audit(call, "start", job.id,
                    "failed" if record["state"] == FAILED else "started",
                    command=record["command"], args=record["args"], pid=record["pid"],
                    error=record["error"])
        return record

    def _replay(self, call: Call, request_id: str, digest: bytes) -> dict[str, Any] | None:
        """The record of the caller's earlier start with ``request_id``, if any; a
        different start under the same key is refused."""
        found = self.jobs.by_request(call.who.name, request_id)
        if found is None:
            return None
        job, asked = found
        if asked != digest:
            raise BadRequest(f"request_id {request_id!r} was already used for another "
                             f"start (job {job.id}): use a new one for a new job")
        self._audit(call, "start", job.id, "replayed", request_id=request_id)
        return job.wire()  # type: ignore[no-any-return]

    async def stop(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Audited twice: the request before the job is signalled, its end after."""
        job = self.access.visible_job(call, p["job"])
        self._audit(call, "stop", job.id, "requested", state=job.state)
        # Observed apart from this request, and before it: the outcome is written when the
        # job ends, before the reply, even if the caller has gone by then.
        job.when_ended().addCallback(self._audit_stopped, call)
        record = await self.jobs.stop(job, p["grace"])
        return record.to_wire()

    def _audit_stopped(self, record: JobRecord, call: Call) -> None:
        self._audit(call, "stop", record.id, "stopped", state=record.state,
                    exit_code=record.exit_code, signal=record.signal)

    def _audit(self, call: Call, method: str, job_id: str, outcome: str,
               **extra: Any) -> None:
        if self.audit is not None:  # never raises: a failed write is logged and counted
            self.audit.record(identity=call.who.name, role=call.who.role, method=method,
                              job_id=job_id, outcome=outcome, **extra)

    def status(self, call: Call, p: dict[str, Any]) -> Encoded:
        return self.access.visible_job(call, p["job"]).packed()

    async def forget(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Remove one ended job, its record and its logs; audited."""
        job = self.access.visible_job(call, p["job"])
        await self.jobs.forget(job)
        self._audit(call, "forget", job.id, "forgotten")
        return {"job": job.id}

    async def wait(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.access.visible_job(call, p["job"])
        record = await job.when_ended()
        return record.to_wire()

    def queues(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Each queue's running and queued counts and its limit, and the daemon's."""
        scheduler = self.jobs.scheduler
        return {"queues": scheduler.counts(), "running": scheduler.running,
                "queued": scheduler.queued, "max_running": scheduler.max_running}

    async def list(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Streams records newest first in batches; the final reply holds their count,
        and ``next_cursor`` when more match past ``limit``."""
        pending = self.jobs.pending()
        if pending is not None:
            await pending  # the table is read: every change so far must be in it
        owner = p["owner"]
        if not self.authz.sees_all(call.who):
            if owner is not None and owner != call.who.name:
                return {"count": 0}  # another's jobs: none the caller may see
            owner = call.who.name
        cursor = p["cursor"]
        if cursor is not None and not (cursor.isdecimal() and cursor.isascii()):
            raise BadRequest("cursor must be a next_cursor from an earlier list reply")
        query = ListQuery(limit=1, before=int(cursor) if cursor is not None else None,
                          owner=owner, state=RUNNING if p["running"] else p["state"],
                          since=p["since"], until=p["until"], name=p["name"],
                          labels=tuple(p["labels"]))
        count, more = await ListStream(call, self.jobs.page, query, p["limit"]).start()
        reply: dict[str, Any] = {"count": count}
        if more is not None:
            reply["next_cursor"] = str(more)
        return reply

    async def logs(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.access.visible_job(call, p["job"])
        if self.follower is None and p["follow"]:
            raise Unavailable("this daemon cannot follow logs")
        if job.state == QUEUED and p["follow"]:
            await job.when_started()  # its log folder is made when it starts
        if job.log_dir is None:  # queued (not followed), or cancelled: no output yet
            return {"offset": p["offset"], "record": job.wire()}
        path = JobLogs(job.log_dir).path(p["stream"])
        with self._stream_slot(call):
            self.jobs.reading(job.id, 1)  # retention and forget leave it alone meanwhile
            self.metrics.stream_opened(p["follow"])
            try:
                stream = LogStream(call, job, path, p["offset"], p["follow"], self.follower)
                offset = await stream.start()
            finally:
                self.jobs.reading(job.id, -1)
                self.metrics.stream_closed(p["follow"])
        return {"offset": offset, "record": job.wire()}

    @contextmanager
    def _stream_slot(self, call: Call) -> Iterator[None]:
        """Take one log stream's place, on the caller's connection and for its identity,
        or raise L{Unavailable} naming the cap; given back when the stream ends."""
        limits, who, connection = self.limits, call.who.name, call.streams
        if self._per_connection.get(connection, 0) >= limits.max_streams_per_connection:
            raise Unavailable(f"more than {limits.max_streams_per_connection} log streams "
                              "on one connection (--max-streams-per-connection)")
        if self._per_identity.get(who, 0) >= limits.max_streams_per_identity:
            raise Unavailable(f"more than {limits.max_streams_per_identity} log streams "
                              f"for {who!r} (--max-streams-per-identity)")
        _count(self._per_connection, connection, 1)
        _count(self._per_identity, who, 1)
        try:
            yield
        finally:
            _count(self._per_connection, connection, -1)
            _count(self._per_identity, who, -1)


async def _result(d: Deferred[dict[str, Any]]) -> dict[str, Any]:
    return await d


def _count(counts: dict[Any, int], key: Any, change: int) -> None:
    """Add ``change`` to ``counts[key]``, dropping keys that reach zero."""
    n = counts.get(key, 0) + change
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def table(access: JobAccess, limits: Limits, follower: FileWatcher | None,
          runas: RunAs, namespaces: NamespaceSupport, metrics: Metrics | None = None
          ) -> Table:
    """The dispatch table: each method's schema and its handler."""
    m = Methods(access, limits, follower, runas, namespaces, metrics)
    handlers: dict[str, Handler] = {
        "hello": m.hello, "whoami": m.whoami, "start": m.start,
        "start_many": m.start_many, "stop": m.stop,
        "status": m.status, "wait": m.wait, "list": m.list, "logs": m.logs,
        "forget": m.forget, "queues": m.queues,
    }
    return {name: (SCHEMAS[name], handler) for name, handler in handlers.items()}
