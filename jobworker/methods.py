"""One handler per RPC method, each with its parameter schema.

Handlers receive parameters already validated and the caller already allowed to
call the method; per-job visibility is checked through ``RPCServer.visible_job``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jobworker import PROTOCOL_VERSION, __version__
from jobworker.codec import (
    Encoded,
    Schema,
    array_head,
    boolean,
    integer,
    job_ref,
    list_of,
    number,
    one_of,
    schema,
    string,
)
from jobworker.errors import UnsupportedVersion
from jobworker.follow import LogStream
from jobworker.logs import JobLogs
from jobworker.messages import FAILED

if TYPE_CHECKING:
    from jobworker.server import Call, Handler, RPCServer

#: Most records, and most encoded bytes of them, in one chunk frame of a ``list`` reply.
#: The bytes bound matters: a record can be ~64 KiB (a start request's arguments), and 500
#: of those would make a frame over the client's 1 MiB limit.
LIST_BATCH = 500
LIST_BATCH_BYTES = 256 * 1024


class Methods:
    def __init__(self, server: RPCServer) -> None:
        self.server = server

    def hello(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        if p["version"] != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"client speaks protocol version {p['version']}; this daemon speaks "
                f"version {PROTOCOL_VERSION}: upgrade the older side")
        return {"version": PROTOCOL_VERSION, "server": f"jobworker/{__version__}",
                "max_frame": self.server.limits.max_frame}

    def whoami(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        return {"identity": call.who.name, "role": call.who.role}

    def start(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.server.jobs.start(owner=call.who.name, command=p["command"],
                                     args=p["args"], env=p["env"], dir=p["dir"],
                                     timeout=p["timeout"])
        record = job.wire()
        if self.server.audit is not None:
            self.server.audit.record(
                identity=call.who.name, role=call.who.role, method="start",
                job_id=record["id"], outcome="failed" if record["state"] == FAILED else "started",
                command=record["command"], args=record["args"], pid=record["pid"],
                error=record["error"])
        return record

    async def stop(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.server.visible_job(call, p["job"])
        if self.server.audit is not None:
            self.server.audit.record(identity=call.who.name, role=call.who.role,
                                     method="stop", job_id=job.id, outcome="requested",
                                     state=job.record().state)
        record = await self.server.jobs.stop(job, p["grace"])
        return record.to_wire()

    def status(self, call: Call, p: dict[str, Any]) -> Encoded:
        return self.server.visible_job(call, p["job"]).packed()

    async def wait(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.server.visible_job(call, p["job"])
        record = await job.when_ended()
        return record.to_wire()

    def list(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        """Streams records newest first in batches; the final reply holds the count."""
        server = self.server
        records: list[bytes] = [job.packed() for job in server.jobs.jobs(
            running_only=p["running"]) if server.authz.can_see(call.who, job.owner)]
        for batch in _chunks(records):
            call.send_chunk(Encoded(array_head(len(batch)) + b"".join(batch)))
        return {"count": len(records)}

    async def logs(self, call: Call, p: dict[str, Any]) -> dict[str, Any]:
        job = self.server.visible_job(call, p["job"])
        path = JobLogs(job.log_dir).path(p["stream"])
        stream = LogStream(call, job, path, p["offset"], p["follow"], self.server.follower)
        offset = await stream.start()
        return {"offset": offset, "record": job.wire()}


def _chunks(records: list[bytes]) -> Iterator[list[bytes]]:
    """Encoded records in runs of at most LIST_BATCH of them and LIST_BATCH_BYTES (a run
    is never empty: one record over the bytes bound still goes, alone)."""
    batch: list[bytes] = []
    size = 0
    for record in records:
        if batch and (len(batch) == LIST_BATCH or size + len(record) > LIST_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += len(record)
    if batch:
        yield batch


def table(server: RPCServer) -> dict[str, tuple[Schema, Handler]]:
    m = Methods(server)
    ref = {"job": job_ref()}
    return {
        "hello": (schema({"version": integer(0, 2**31)},
                         {"client": (string(128), None)}), m.hello),
        "whoami": (schema(), m.whoami),
        "start": (schema({"command": string(4096, nonempty=True)}, {
            "args": (list_of(string(65536), 4096), []),
            # Bad env entries (NUL included) become a failed job record, not a bad_request.
            "env": (list_of(string(65536, no_nul=False), 1024), []),
            "dir": (string(4096, nonempty=True), None),
            "timeout": (number(0.001, 10.0**8), None),
        }), m.start),
        "stop": (schema(ref, {"grace": (number(0.0, 3600.0), None)}), m.stop),
        "status": (schema(ref), m.status),
        "wait": (schema(ref), m.wait),
        "list": (schema({}, {"running": (boolean(), False)}), m.list),
        "logs": (schema(ref, {
            "stream": (one_of("stdout", "stderr"), "stdout"),
            "offset": (integer(0, 2**63 - 1), 0),
            "follow": (boolean(), False),
        }), m.logs),
    }
