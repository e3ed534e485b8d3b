"""One handler per RPC method, each with its parameter schema.

Handlers receive parameters already validated by their schema
(``jobworker.wire.params``) and the caller already allowed to call the method; per-job
visibility is checked through ``JobAccess.visible_job``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jobworker.daemon.access import JobAccess
from jobworker.daemon.call import Call
from jobworker.daemon.follow import LogStream
from jobworker.daemon.limits import Limits
from jobworker.daemon.listing import ListStream
from jobworker.daemon.watcher import FileWatcher
from jobworker.jobs.logs import JobLogs
from jobworker.wire.codec import Encoded
from jobworker.wire.errors import Unavailable
from jobworker.wire.hello import check_version, hello_result
from jobworker.wire.params import SCHEMAS
from jobworker.wire.record import FAILED, JobRecord
from jobworker.wire.schema import Schema

#: A handler returns its result, or a coroutine when it has to wait (stop, wait, logs).
Handler = Callable[[Call, dict[str, Any]], Any]
#: Method name -> its parameter schema and its handler.
Table = dict[str, tuple[Schema, Handler]]

class Methods:
    """One handler per method."""

    def __init__(self, access: JobAccess, limits: Limits,
                 follower: FileWatcher | None) -> None:
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

    def start(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Audited twice: the decision before the job starts, its outcome after."""
        self.jobs.check_admission()
        job_id = self.jobs.new_id()
        self._audit(call, "start", job_id, "allowed", command=p["command"], args=p["args"])
        job = self.jobs.start(owner=call.who.name, command=p["command"], args=p["args"],
                              env=p["env"], dir=p["dir"], timeout=p["timeout"], job_id=job_id,
                              memory=p["memory"], cpu=p["cpu"], pids=p["pids"])
        record = job.wire()
        self._audit(call, "start", job_id,
                    "failed" if record["state"] == FAILED else "started",
                    command=record["command"], args=record["args"], pid=record["pid"],
                    error=record["error"])
        return record

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

    async def wait(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.access.visible_job(call, p["job"])
        record = await job.when_ended()
        return record.to_wire()

    async def list(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Streams records newest first in batches; the final reply holds the count."""
        jobs = [job for job in self.jobs.jobs(running_only=p["running"])
                if self.authz.can_see(call.who, job.owner)]
        return {"count": await ListStream(call, jobs).start()}

    async def logs(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.access.visible_job(call, p["job"])
        path = JobLogs(job.log_dir).path(p["stream"])
        if self.follower is None and p["follow"]:
            raise Unavailable("this daemon cannot follow logs")
        with self._stream_slot(call):
            stream = LogStream(call, job, path, p["offset"], p["follow"], self.follower)
            offset = await stream.start()
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


def _count(counts: dict[Any, int], key: Any, change: int) -> None:
    """Add ``change`` to ``counts[key]``, dropping keys that reach zero."""
    n = counts.get(key, 0) + change
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def table(access: JobAccess, limits: Limits, follower: FileWatcher | None) -> Table:
    """The dispatch table: each method's schema and its handler."""
    m = Methods(access, limits, follower)
    handlers: dict[str, Handler] = {
        "hello": m.hello, "whoami": m.whoami, "start": m.start, "stop": m.stop,
        "status": m.status, "wait": m.wait, "list": m.list, "logs": m.logs,
    }
    return {name: (SCHEMAS[name], handler) for name, handler in handlers.items()}
