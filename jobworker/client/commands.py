"""One function per ``jwclient`` subcommand, each on a connected synchronous ``Client``.

Every failure ends as one line ``jwclient: <message>`` on stderr (with ``--json``, an
``{"error": {"code", "message"}}`` document on stdout) and a non-zero exit; Ctrl-C ends
quietly with 130 and a closed output pipe with 141 (docs/cli.md, Exit status).
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from jobworker.client import render
from jobworker.client.endpoint import ClientConfig, ClientError
from jobworker.client.sync import Client, start_params
from jobworker.wire.errors import ConnectionLost, JobWorkerError, NotFound
from jobworker.wire.record import FAILED, JobRecord

Command = Callable[[Client, argparse.Namespace], int]

#: Exit statuses of an interrupted command (128 + SIGINT) and of one whose output pipe
#: closed (128 + SIGPIPE), as a shell reports them.
INTERRUPTED_EXIT = 130
BROKEN_PIPE_EXIT = 141
#: ``wait``'s and ``run``'s status when jwclient itself fails (as ``docker run``).
OWN_ERROR_EXIT = 125


class Failed(Exception):
    """A command's own failure, with its exit status and its ``--json`` error code."""

    def __init__(self, message: str, status: int = 1, code: str = "failed") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def connect(config: ClientConfig, timeout: float) -> Client:
    return Client(config, timeout=timeout)


#: Commands naming one job, which another configured worker may know.
JOB_COMMANDS = ("status", "stop", "logs", "forget", "wait")


def run(args: argparse.Namespace, config: ClientConfig | None,
        workers: dict[str, Any] | None = None, current: str | None = None) -> int:
    """Connect, run the command, and turn every way it can end into an exit status.
    ``workers``: every configured worker's config, ``current`` the chosen one's name."""
    own_error = OWN_ERROR_EXIT if args.command in ("wait", "run") else 1
    try:
        status = _dispatch(args, config, workers or {}, current)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_EXIT
    except Failed as e:
        report(args, e.code, str(e))
        return e.status if e.status != 1 else own_error
    except ClientError as e:
        report(args, "unreachable", str(e))
        return own_error
    except JobWorkerError as e:
        report(args, e.code, e.message)
        return own_error


def _dispatch(args: argparse.Namespace, config: ClientConfig | None,
              workers: dict[str, Any], current: str | None) -> int:
    if args.command == "workers" or getattr(args, "all_workers", False):
        from jobworker.client import fleet

        if args.command == "workers":
            return fleet.show_workers(args, workers, current)
        return fleet.list_all(args, workers, _list_filters(args))
    assert config is not None
    try:
        with connect(config, args.connect_timeout) as client:
            return COMMANDS[args.command](client, args)
    except NotFound:
        # The job may be on another configured worker, unless one was asked for.
        refs: list[str | int] = args.job if isinstance(args.job, list) else [args.job]
        if args.command not in JOB_COMMANDS or len(refs) != 1 or len(workers) < 2 or \
                args.worker or os.environ.get("JWCLIENT_WORKER"):
            raise
        from jobworker.client import fleet

        ref = refs[0]
        found = fleet.find_elsewhere(ref, workers, current, args.connect_timeout)
        if found is None:
            raise
        with connect(found[1], args.connect_timeout) as client:
            return COMMANDS[args.command](client, args)


def report(args: argparse.Namespace, code: str, message: str) -> None:
    """One error: a line on stderr, or with ``--json`` a document on stdout."""
    if getattr(args, "json", False):
        _print_json({"error": {"code": code, "message": message}})
        sys.stdout.flush()
    else:
        error(message)


def error(message: str) -> None:
    sys.stderr.write(f"jwclient: {message}\n")
    sys.stderr.flush()


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the exit's flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _print_json(value: Any) -> None:
    import json  # only for --json: most calls print tables

    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _print_record(args: argparse.Namespace, record: JobRecord) -> None:
    if args.json:
        _print_json(record.to_wire())
    else:
        sys.stdout.write(render.record(record, time.time(), sys.stdout.isatty()))


def whoami(client: Client, args: argparse.Namespace) -> int:
    me = client.whoami()
    if args.json:
        _print_json(me)
    else:
        sys.stdout.write(f"identity: {me['identity']}\nrole:     {me['role'] or '(none)'}\n")
        if "audit_failures" in me:  # an admin's view
            sys.stdout.write(f"audit failures: {me['audit_failures']}\n")
    return 0


#: The ``start`` options jwclient takes, by their argparse dest and wire name alike.
START_OPTIONS = ("env", "dir", "timeout", "user", "isolate", "memory", "cpu", "pids",
                 "io_read", "io_write", "queue", "priority", "after", "name")


def start_request(args: argparse.Namespace, request_id: str | None = None) -> dict[str, Any]:
    """The ``start`` request of ``start``/``run``'s options: the one place they meet the
    wire (a new option: its name in START_OPTIONS)."""
    options = {name: getattr(args, name, None) for name in START_OPTIONS}
    return start_params(args.program, args.args, request_id=request_id or new_request_id(),
                        labels=getattr(args, "label", None), **options)


def new_request_id() -> str:
    """A fresh retry key: 128 random bits (``uuid`` would cost ~5 ms of imports)."""
    return os.urandom(16).hex()


#: Reconnections ``start`` makes when the connection drops before its reply.
START_RETRIES = 3


def _start_retrying(client: Client, args: argparse.Namespace) -> JobRecord:
    """Retried on a dropped connection with the same request_id: the daemon starts the
    program once, however many times the request reached it."""
    params = start_request(args)
    for attempt in range(1, START_RETRIES + 2):
        try:
            return JobRecord.from_wire(client.call("start", params))
        except ConnectionLost:
            if attempt > START_RETRIES:
                raise
        client = _reconnect(client.config, args, attempt)
    raise AssertionError("unreachable")


def _reconnect(config: ClientConfig, args: argparse.Namespace, attempt: int) -> Client:
    """A new session after a short backoff; the last ClientError if none can be made."""
    for tries in range(attempt, START_RETRIES + 1):
        time.sleep(0.2 * 2**tries)  # a backoff, not a synchronisation
        try:
            return connect(config, args.connect_timeout)
        except ClientError:
            if tries == START_RETRIES:
                raise
    raise ClientError("cannot reconnect")


def start(client: Client, args: argparse.Namespace) -> int:
    record = _start_retrying(client, args)
    if args.json:  # the record says why it failed: one JSON document, exit 1
        _print_json(record.to_wire())
        return 1 if record.state == FAILED else 0
    if record.state != FAILED:
        sys.stdout.write(record.id + "\n")
    if record.state == FAILED:
        raise Failed(f"cannot start {args.program}: {record.error} (job {record.id})")
    return 0


def stop(client: Client, args: argparse.Namespace) -> int:
    _print_record(args, client.stop(args.job, grace=args.grace))
    return 0


def queue(client: Client, args: argparse.Namespace) -> int:
    result = client.call("queues")
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(render.queues(result))
    return 0


def status(client: Client, args: argparse.Namespace) -> int:
    _print_record(args, client.status(args.job))
    return 0


def _list_filters(args: argparse.Namespace) -> dict[str, Any]:
    now = time.time()
    return {"state": args.state, "owner": args.owner, "name": args.name,
            "labels": args.label or None,
            "since": now - args.since if args.since else None,
            "until": now - args.until if args.until else None}


def list_(client: Client, args: argparse.Namespace) -> int:
    filters = _list_filters(args)
    more = None
    if args.all:
        records = list(client.list(running=args.running, **filters))
    else:
        records, more = client.list_page(running=args.running, limit=args.limit, **filters)
    if more is not None:
        sys.stderr.write(f"jwclient: showing the newest {len(records)} jobs; more exist "
                         "(--limit N, or --all)\n")
    if args.json:
        _print_json([r.to_wire() for r in records])
    else:
        sys.stdout.write(render.table(records, time.time(), sys.stdout.isatty(),
                                      render.terminal_width(args.wide)))
    return 0


def _writer(stream: Any) -> Callable[[bytes], None]:
    out = stream.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    return write


def last_lines(data: bytes, n: int) -> bytes:
    """The last ``n`` lines of ``data`` (a last line without a newline counts)."""
    if n <= 0:
        return b""
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(n):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return data
    return data[pos + 1:]


#: ``logs --tail`` keeps at most about this much of a log while it looks for the end.
TAIL_BUFFER = 4 * 1024 * 1024


def _tail(client: Client, args: argparse.Namespace, stream: str) -> int:
    """Write the last ``--tail`` lines of ``stream``; the offset just past them all."""
    kept = bytearray()
    logs = client.logs(args.job, stream, args.offset)
    for chunk in logs:
        kept += chunk
        if len(kept) > TAIL_BUFFER:
            kept = bytearray(last_lines(bytes(kept), args.tail))
    _writer(sys.stdout if stream != "stderr" or not args.both else sys.stderr)(
        last_lines(bytes(kept), args.tail))
    return logs.offset


def logs(client: Client, args: argparse.Namespace) -> int:
    if args.offset < 0:
        raise Failed("--offset must not be negative", 2, "usage")
    streams = ["stdout", "stderr"] if args.both else ["stderr" if args.stderr else "stdout"]
    offsets = {s: args.offset for s in streams}
    if args.tail is not None:
        offsets = {s: _tail(client, args, s) for s in streams}
        if not args.follow:
            return 0
    if len(streams) == 1:
        (only,) = streams
        write = _writer(sys.stdout)
        for chunk in client.logs(args.job, only, offsets[only], args.follow):
            write(chunk)
        return 0
    sinks = {"stdout": _writer(sys.stdout), "stderr": _writer(sys.stderr)}
    for name in streams:  # each from its own offset, on one connection
        client.session.send("logs", {"job": args.job, "stream": name,
                                     "offset": offsets[name], "follow": args.follow},
                            _chunks_to(sinks[name]))
    _drain(client)
    return 0


def _chunks_to(sink: Callable[[bytes], None]) -> Callable[[Any], None]:
    def on_chunk(chunk: Any) -> None:
        if not isinstance(chunk, bytes):
            raise ConnectionLost("server sent a log chunk that is not bytes")
        sink(chunk)

    return on_chunk


def _drain(client: Client) -> None:
    """Read until nothing is in flight; raise the first error any request met."""
    while client.session.in_flight():
        client.session.read_frame()
    client.session.raise_errors()


def forget(client: Client, args: argparse.Namespace) -> int:
    result = client.forget(args.job)
    if args.json:
        _print_json(result)
    return 0


def wait(client: Client, args: argparse.Namespace) -> int:
    """Exit 125 if any job could not start (or be found), else the first non-zero
    status in argument order, else 0."""
    results = client.wait_many(args.job)
    if len(results) == 1 and isinstance(results[0], NotFound):
        raise results[0]  # one job: as status would (and perhaps on another worker)
    records = [r for r in results if isinstance(r, JobRecord)]
    if args.json:
        wire = [r.to_wire() if isinstance(r, JobRecord)
                else {"error": r.to_wire()} for r in results]
        _print_json(wire[0] if len(wire) == 1 else wire)
    else:
        for result in results:
            if isinstance(result, JobWorkerError):
                error(result.message)
            elif len(records) > 1:
                sys.stdout.write(f"{result.id}  {render.outcome(result)}\n")
            else:
                _print_record(args, result)
    if len(records) < len(results) or any(r.state == FAILED for r in records):
        return OWN_ERROR_EXIT
    return next((s for s in (r.exit_status() for r in records) if s != 0), 0)


def _stdin_warning() -> None:
    """Warn once when something is piped or redirected into ``run``: the job never sees
    it (its stdin is /dev/null)."""
    try:
        st = os.fstat(0)
    except OSError:
        return
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or (
            stat.S_ISREG(st.st_mode) and st.st_size > 0):
        error("warning: the job's stdin is /dev/null; what is piped into jwclient is "
              "not passed on")


def run_(client: Client, args: argparse.Namespace) -> int:
    """Start, stream both outputs here, exit with the job's status.  Ctrl-C (or a closed
    stdout) stops the job; a second Ctrl-C leaves at once."""
    _stdin_warning()
    session = client.session
    interrupts: list[int] = []
    job: list[str] = []
    stopping: list[int] = []
    broken: list[bool] = []

    def stop_job(why: str) -> None:
        if job and not stopping:
            if why:
                error(f"{why}: stopping job {job[0]}")
            stopping.append(session.send("stop", {"job": job[0]}))

    def on_wake() -> None:  # between frames, after a signal
        if len(interrupts) > 1:
            raise KeyboardInterrupt
        if interrupts:
            stop_job("interrupted")

    out_write, err_write = _writer(sys.stdout), _writer(sys.stderr)

    def to_stdout(data: bytes) -> None:
        if broken:
            return
        try:
            out_write(data)
        except BrokenPipeError:
            broken.append(True)
            _silence_stdout()
            stop_job("")

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    old_wake = signal.set_wakeup_fd(wake_w)
    session.wake_fd, session.on_wake = wake_r, on_wake
    try:
        record = JobRecord.from_wire(session.call("start", start_request(args)))
        if record.state == FAILED:
            raise Failed(f"cannot start {args.program}: {record.error}", OWN_ERROR_EXIT)
        job.append(record.id)
        if interrupts:
            stop_job("interrupted")
        final = client.logs_to(record.id, {"stdout": to_stdout, "stderr": err_write},
                               follow=True)
        if stopping:  # its reply comes just after the logs' final replies
            session.wait_for(stopping[0])
    finally:
        session.wake_fd = session.on_wake = None
        signal.set_wakeup_fd(old_wake)
        signal.signal(signal.SIGINT, previous)
        os.close(wake_r)
        os.close(wake_w)
    ended = JobRecord.from_wire(final["record"])
    if broken:
        return BROKEN_PIPE_EXIT
    if interrupts or ended.timed_out or ended.state == "stopped" or ended.oom_killed:
        error(f"job {ended.id} {render.outcome(ended)}")
    return ended.exit_status()


def submit(client: Client, args: argparse.Namespace) -> int:
    from jobworker.client import batch

    try:
        specs = batch.load(args.file)
    except batch.BatchError as e:
        raise Failed(str(e), 2, "bad_batch") from None
    return batch.run(client, specs, wait=args.wait, as_json=args.json, out=sys.stdout)


COMMANDS: dict[str, Command] = {
    "whoami": whoami, "start": start, "stop": stop, "status": status, "list": list_,
    "logs": logs, "wait": wait, "run": run_, "submit": submit, "forget": forget,
    "queue": queue,
}
