"""Each method's parameter schema: the one place a request's values are checked.

The daemon validates every request against these before a handler runs; the job manager
applies the same checks of a start's arguments and time limit when called directly.
"""

from __future__ import annotations

from jobworker.wire.schema import (
    Schema,
    boolean,
    integer,
    job_ref,
    list_of,
    number,
    one_of,
    schema,
    string,
)

#: A start's arguments and its run-time limit, shared with ``JobManager.start``.
START_ARGS = list_of(string(65536), 4096)
START_TIMEOUT = number(0.001, 10.0**8)
#: Resource limits a start may ask for: bytes of memory, cores of CPU time, processes.
START_MEMORY = integer(1 << 20, 1 << 50)
START_CPU = number(0.01, 4096.0)
#: At least 2: the daemon's spawning thread is in the job's cgroup while it forks.
START_PIDS = integer(2, 1 << 22)

_JOB = {"job": job_ref()}

SCHEMAS: dict[str, Schema] = {
    "hello": schema({"version": integer(0, 2**31)}, {"client": (string(128), None)}),
    "whoami": schema(),
    "start": schema({"command": string(4096, nonempty=True)}, {
        "args": (START_ARGS, []),
        # Bad env entries (NUL included) become a failed job record, not a bad_request.
        "env": (list_of(string(65536, no_nul=False), 1024), []),
        "dir": (string(4096, nonempty=True), None),
        "timeout": (START_TIMEOUT, None),
        "memory": (START_MEMORY, None),
        "cpu": (START_CPU, None),
        "pids": (START_PIDS, None),
    }),
    "stop": schema(_JOB, {"grace": (number(0.0, 3600.0), None)}),
    "status": schema(_JOB),
    "wait": schema(_JOB),
    "list": schema({}, {"running": (boolean(), False)}),
    "logs": schema(_JOB, {
        "stream": (one_of("stdout", "stderr"), "stdout"),
        "offset": (integer(0, 2**63 - 1), 0),
        "follow": (boolean(), False),
    }),
}
