"""The job record: its states, and its fields as one list from which every form is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

# Job states.  ``lost``: the daemon can no longer account for the job's end (its exit
# status was taken elsewhere; later, a job a restarted daemon cannot re-adopt).
# ``queued``: admitted, waiting for a slot (docs/jobs.md); ``cancelled``: ended while
# queued, never started.
QUEUED = "queued"
RUNNING = "running"
EXITED = "exited"
STOPPED = "stopped"
FAILED = "failed"
LOST = "lost"
CANCELLED = "cancelled"
STATES = (QUEUED, RUNNING, EXITED, STOPPED, FAILED, LOST, CANCELLED)
ENDED_STATES = (EXITED, STOPPED, FAILED, LOST, CANCELLED)
#: The queue of a start that names none.
DEFAULT_QUEUE = "default"
#: The namespaces a job may be started in (start's ``isolate``, the record's field).
ISOLATE = ("pid", "net", "mount")


@dataclass(frozen=True)
class JobRecord:
    """One job as clients see it; ``to_wire`` is exactly what ``jwclient --json`` prints."""

    id: str
    pid: int | None
    command: str
    args: list[str]
    dir: str
    owner: str
    state: str
    exit_code: int | None
    signal: str | None
    error: str | None
    started_at: str | None  # null while queued, and for a job cancelled in the queue
    ended_at: str | None
    log_dir: str | None  # named when the job starts
    timed_out: bool = False
    timeout: float | None = None
    uid: int | None = None  # whom the job ran as (null: it never started)
    gid: int | None = None
    isolate: list[str] | None = None  # the namespaces it ran in (null: none)
    # What the job's cgroup counted: cpu_seconds, memory_peak (bytes), io_read_bytes and
    # io_write_bytes (None where the host cannot count one); live while the job runs, final
    # once its last process has gone.  None: the job had no cgroup (docs/isolation.md).
    usage: dict[str, Any] | None = None
    # The limits the job runs under: memory (bytes), cpu (cores), pids (processes),
    # io_read and io_write (bytes per second), each None when unlimited, and with an io
    # limit io_devices (the disks throttled, "MAJ:MIN"); None: no limits at all.
    limits: dict[str, Any] | None = None
    # The kernel killed a process of the job for want of memory (under its memory limit);
    # the daemon then ended the rest of the job.
    oom_killed: bool = False
    # Scheduling (docs/jobs.md): when it was admitted (null: it never waited in a queue),
    # its queue and priority.
    queued_at: str | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    # The jobs it waits for (start's ``after``): it starts once all have exited 0.
    after: list[str] | None = None
    # Its name (unique among its owner's queued and running jobs) and labels (key: value).
    name: str | None = None
    labels: dict[str, str] | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def to_wire(self) -> dict[str, Any]:
        return wire_map(self)

    @classmethod
    def from_wire(cls, value: Any) -> JobRecord:
        """Build from a decoded map, ignoring fields a newer daemon may add."""
        if not isinstance(value, dict):
            raise ValueError("job record must be a map")
        return cls(**{k: v for k, v in value.items() if k in _FIELD_SET})

    @classmethod
    def of(cls, source: Any) -> JobRecord:
        """The record of anything with an attribute for each field (a live job)."""
        return cls(*_values(source))

    def exit_status(self) -> int:
        """The shell-style status: exit code, or 128+N when killed by signal N."""
        import signal as _signal

        if self.exit_code is not None:
            return self.exit_code
        if self.signal:
            try:
                return 128 + int(_signal.Signals[self.signal])
            except KeyError:
                return 128
        return 1


#: The record's fields in order: the one list every form of a record is built from.
FIELDS = tuple(f.name for f in fields(JobRecord))
_FIELD_SET = frozenset(FIELDS)
# One C call takes every field off an object (a JobRecord, or a live Job whose attributes
# carry the same names): not dataclasses.asdict, which deep-copies and costs ~15 us.
_values = attrgetter(*FIELDS)


def _wire_map_from_fields() -> Callable[[Any], dict[str, Any]]:
    """``wire_map``, written out from FIELDS once at import, as dataclasses writes its
    ``__init__``: a dict display of the fields costs a third of ``dict(zip(...))`` (0.7
    against 2.0 us), and every start and followed log reply builds one."""
    items = ", ".join(f"{name!r}: list(source.args)" if name == "args"
                      else f"{name!r}: source.{name}" for name in FIELDS)
    namespace: dict[str, Any] = {}
    exec(f"def wire_map(source):\n    return {{{items}}}\n", namespace)  # noqa: S102
    built: Callable[[Any], dict[str, Any]] = namespace["wire_map"]
    built.__doc__ = """The record of ``source`` (a JobRecord, or a live job with an attribute
    for each field) as the map a client receives and ``jwclient --json`` prints."""
    return built


wire_map = _wire_map_from_fields()
