"""Each method's parameter schema: the one place a request's values are checked.

The daemon validates every request against these before a handler runs; the job manager
applies the same checks of a start's arguments and time limit when called directly.
"""

from __future__ import annotations

import hashlib
from typing import Any

from jobworker.wire.codec import encode
from jobworker.wire.record import DEFAULT_QUEUE, ISOLATE, STATES
from jobworker.wire.schema import (
    Schema,
    boolean,
    integer,
    job_name,
    job_ref,
    label,
    list_of,
    mapping,
    number,
    one_of,
    schema,
    string,
    subset_of,
)

#: A start's arguments and its run-time limit, shared with ``JobManager.start``.
START_ARGS = list_of(string(65536), 4096)
START_TIMEOUT = number(0.001, 10.0**8)
#: Resource limits a start may ask for: bytes of memory, cores of CPU time, processes.
START_MEMORY = integer(1 << 20, 1 << 50)
START_CPU = number(0.01, 4096.0)
#: At least 2: the daemon's spawning thread is in the job's cgroup while it forks.
START_PIDS = integer(2, 1 << 22)
#: Bytes per second read or written on the disks of the job's directory and its logs.
START_IO = integer(1 << 10, 1 << 50)
#: Scheduling: a queue's name (the policy's [queue.NAME]) and a priority (higher first).
START_QUEUE = string(64, nonempty=True)
START_PRIORITY = integer(-1000, 1000)

_JOB = {"job": job_ref()}
#: Most starts in one ``start_many``: its reply (their records) stays well under 1 MiB.
START_MANY = 256

SCHEMAS: dict[str, Schema] = {
    "hello": schema({"version": integer(0, 2**31)}, {"client": (string(128), None)}),
    "whoami": schema(),
    "start": schema({"command": string(4096, nonempty=True)}, {
        "args": (START_ARGS, []),
        # Bad env entries (NUL included) become a failed job record, not a bad_request.
        "env": (list_of(string(65536, no_nul=False), 1024), []),
        "dir": (string(4096, nonempty=True), None),
        "timeout": (START_TIMEOUT, None),
        # A client's retry key: a second start with it returns the first job.
        "request_id": (string(128, nonempty=True), None),
        # Run as this Unix user, if the policy allows the caller (root daemons only).
        "user": (string(256, nonempty=True), None),
        # New namespaces for the job (root daemons only): docs/protocol.md.
        "isolate": (subset_of(*ISOLATE), []),
        "memory": (START_MEMORY, None),
        "cpu": (START_CPU, None),
        "pids": (START_PIDS, None),
        "io_read": (START_IO, None),
        "io_write": (START_IO, None),
        "queue": (START_QUEUE, DEFAULT_QUEUE),
        "priority": (START_PRIORITY, 0),
        # Jobs (ids or pids the caller may see) that must exit 0 before this one starts.
        "after": (list_of(job_ref(), 64), []),
        # Unique among the caller's queued and running jobs; a job may be named by it.
        "name": (job_name(), None),
        "labels": (list_of(label(), 32), []),
    }),
    # Many starts in one request (each a map of start's params), answered in order.
    "start_many": schema({"jobs": list_of(mapping(), START_MANY)}),
    "stop": schema(_JOB, {"grace": (number(0.0, 3600.0), None)}),
    "status": schema(_JOB),
    "forget": schema(_JOB),
    "wait": schema(_JOB),
    "list": schema({}, {
        "running": (boolean(), False),  # the same as state="running"
        "limit": (integer(1, 2**31), None),  # None: every job that matches
        "cursor": (string(32, nonempty=True), None),  # a previous reply's next_cursor
        "state": (one_of(*STATES), None),
        "owner": (string(4096, nonempty=True), None),
        "since": (number(0.0, 10.0**11), None),  # started at or after (Unix seconds)
        "until": (number(0.0, 10.0**11), None),  # started before
        "name": (job_name(), None),
        "labels": (list_of(label(), 32), []),  # jobs with every one of these labels
    }),
    "queues": schema(),
    "logs": schema(_JOB, {
        "stream": (one_of("stdout", "stderr"), "stdout"),
        "offset": (integer(0, 2**63 - 1), 0),
        "follow": (boolean(), False),
    }),
}


def start_digest(params: dict[str, Any]) -> bytes:
    """What a start asked for, in 16 bytes: a retried start (same ``request_id``) must ask
    for the same."""
    asked = [params[k] for k in ("command", "args", "env", "dir", "timeout", "user")]
    if params.get("isolate"):  # only then: the digests of earlier starts stay the same
        asked.append(sorted(params["isolate"]))
    if params.get("name") is not None or params.get("labels"):
        asked.append([params.get("name"), sorted(params.get("labels") or [])])
    if params.get("after"):
        asked.append([str(ref) for ref in params["after"]])
    if params.get("queue", DEFAULT_QUEUE) != DEFAULT_QUEUE or params.get("priority"):
        asked.append([params.get("queue", DEFAULT_QUEUE), params.get("priority", 0)])
    limits = [params.get(k) for k in ("memory", "cpu", "pids", "io_read", "io_write")]
    if any(v is not None for v in limits):
        asked.append(["limits", *limits])
    return hashlib.blake2b(encode(asked), digest_size=16).digest()
