"""One function per ``jwclient`` subcommand, run on the reactor.

Every failure ends as one line ``jwclient: <message>`` on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.internet.task import deferLater, react

from jobworker.client import render
from jobworker.client.api import Client, ClientConfig, ClientError, connect
from jobworker.wire.errors import ConnectionLost, JobWorkerError
from jobworker.wire.record import FAILED, JobRecord

Command = Callable[[Any, Client, argparse.Namespace], Coroutine[Any, Any, int]]


class Failed(Exception):
    """A command's own failure, with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def run(args: argparse.Namespace, creds: tuple[str, str, str]) -> int:
    config = ClientConfig(args.server, *creds)
    command = COMMANDS[args.command]
    own_error = 125 if args.command in ("wait", "run") else 1
    status = [own_error]

    async def go(reactor: Any) -> None:
        try:
            client = await connect(reactor, config, timeout=args.connect_timeout)
        except ClientError as e:
            _error(str(e))
            return
        try:
            status[0] = await command(reactor, client, args)
        except Failed as e:
            _error(str(e))
            status[0] = e.status if e.status != 1 else own_error
        except JobWorkerError as e:
            _error(f"{e.code}: {e.message}" if e.code not in e.message else e.message)
        except (BrokenPipeError, KeyboardInterrupt):
            status[0] = own_error
        finally:
            if client.protocol.transport is not None:
                client.protocol.transport.loseConnection()

    def main(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(go(reactor))

    try:
        react(main)
    except SystemExit:
        pass
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return status[0]


def _error(message: str) -> None:
    sys.stderr.write(f"jwclient: {message}\n")
    sys.stderr.flush()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _print_record(args: argparse.Namespace, record: JobRecord) -> None:
    if args.json:
        _print_json(record.to_wire())
    else:
        sys.stdout.write(render.record(record, time.time(), sys.stdout.isatty()))


async def whoami(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    me = await client.call("whoami")
    if args.json:
        _print_json(me)
    else:
        sys.stdout.write(f"identity: {me['identity']}\nrole:     {me['role'] or '(none)'}\n")
        if "audit_failures" in me:  # an admin's view
            sys.stdout.write(f"audit failures: {me['audit_failures']}\n")
    return 0


async def _start(client: Client, args: argparse.Namespace,
                 request_id: str | None = None) -> JobRecord:
    return await client.start(args.program, args.args, env=args.env, dir=args.dir,
                              timeout=args.timeout,
                              request_id=request_id or str(uuid.uuid4()),
                              user=getattr(args, "user", None),
                              isolate=getattr(args, "isolate", None),
                              memory=getattr(args, "memory", None),
                              cpu=getattr(args, "cpu", None), pids=getattr(args, "pids", None),
                              queue=getattr(args, "queue", None),
                              priority=getattr(args, "priority", 0),
                              after=getattr(args, "after", None),
                              name=getattr(args, "name", None),
                              labels=getattr(args, "label", None))


#: Reconnections ``start`` makes when the connection drops before its reply.
START_RETRIES = 3


async def _start_retrying(reactor: Any, client: Client, args: argparse.Namespace
                          ) -> JobRecord:
    """Retried on a dropped connection with the same request_id: the daemon starts the
    program once, however many times the request reached it."""
    request_id = str(uuid.uuid4())
    for attempt in range(1, START_RETRIES + 2):
        try:
            return await _start(client, args, request_id)
        except ConnectionLost:
            if attempt > START_RETRIES or client.config is None:
                raise
        client = await _reconnect(reactor, client.config, args, attempt)
    raise AssertionError("unreachable")


async def _reconnect(reactor: Any, config: ClientConfig, args: argparse.Namespace,
                     attempt: int) -> Client:
    """A new session after a short backoff; the last ClientError if none can be made."""
    for tries in range(attempt, START_RETRIES + 1):
        await deferLater(reactor, 0.2 * 2**tries, lambda: None)
        try:
            return await connect(reactor, config, timeout=args.connect_timeout)
        except ClientError:
            if tries == START_RETRIES:
                raise
    raise ClientError("cannot reconnect")


async def start(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    record = await _start_retrying(reactor, client, args)
    if args.json:
        _print_json(record.to_wire())
    elif record.state != FAILED:
        sys.stdout.write(record.id + "\n")
    if record.state == FAILED:
        raise Failed(f"cannot start {args.program}: {record.error} (job {record.id})")
    return 0


async def queue(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    result = await client.call("queues")
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(render.queues(result))
    return 0


async def stop(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    _print_record(args, await client.record("stop", args.job, grace=args.grace))
    return 0


async def status(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    _print_record(args, await client.record("status", args.job))
    return 0


async def list_(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    now = time.time()
    filters = {"state": args.state, "owner": args.owner, "name": args.name,
               "labels": args.label or None,
               "since": now - args.since if args.since else None,
               "until": now - args.until if args.until else None}
    if args.all:
        records = await client.list(running=args.running, **filters)
        more = None
    else:
        records, more = await client.list_page(running=args.running, limit=args.limit,
                                               **filters)
    if more is not None:
        sys.stderr.write(f"jwclient: showing the newest {len(records)} jobs; more exist "
                         "(--limit N, or --all)\n")
    if args.json:
        _print_json([r.to_wire() for r in records])
    else:
        sys.stdout.write(render.table(records, time.time(), sys.stdout.isatty()))
    return 0


def _sink(stream: Any) -> Callable[[bytes], None]:
    out = stream.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    return write


async def _follow_both(client: Client, job: str | int, follow: bool,
                       offset: int = 0) -> dict[str, Any]:
    try:
        results = await DeferredList(
            [Deferred.fromCoroutine(client.logs(job, _sink(sys.stdout), "stdout", offset,
                                                follow)),
             Deferred.fromCoroutine(client.logs(job, _sink(sys.stderr), "stderr", offset,
                                                follow))],
            fireOnOneErrback=True, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
    return results[1][1]


async def logs(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    if args.offset < 0:
        raise Failed("--offset must not be negative", 2)
    if args.both:
        await _follow_both(client, args.job, args.follow, args.offset)
    else:
        stream = "stderr" if args.stderr else "stdout"
        await client.logs(args.job, _sink(sys.stdout), stream, args.offset, args.follow)
    return 0


async def forget(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    result = await client.call("forget", {"job": args.job})
    if args.json:
        _print_json(result)
    return 0


async def wait(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    record = await client.record("wait", args.job)
    _print_record(args, record)
    return record.exit_status()


async def run_(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    interrupted: list[int] = []
    started: list[JobRecord] = []
    stopping: list[Deferred[Any]] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        if interrupted:  # a second Ctrl-C: leave now, the stop is already on its way
            reactor.callFromThread(reactor.stop)
            return
        interrupted.append(signum)
        if started:
            reactor.callFromThread(_stop_job)

    def _stop_job() -> None:
        _error(f"interrupted: stopping job {started[0].id}")
        stopping.append(client.call("stop", {"job": started[0].id}).addErrback(
            lambda f: _error(f"stop failed: {f.getErrorMessage()}")))

    # Handled from before the start, so a Ctrl-C while it is under way still stops the job.
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        record = await _start(client, args)
        if record.state == FAILED:
            raise Failed(f"cannot start {args.program}: {record.error}", 125)
        started.append(record)
        if interrupted:
            _stop_job()
        final = await _follow_both(client, record.id, True)
        if stopping:  # its reply comes just after the logs' final replies: wait for it
            await stopping[0]
    finally:
        signal.signal(signal.SIGINT, previous)
    ended = JobRecord.from_wire(final["record"])
    if interrupted:
        _error(f"job {ended.id} {render.outcome(ended)}")
    return ended.exit_status()


async def submit(reactor: Any, client: Client, args: argparse.Namespace) -> int:
    from jobworker.client import batch

    try:
        specs = batch.load(args.file)
    except batch.BatchError as e:
        raise Failed(str(e), 2) from None
    return await batch.run(reactor, client, specs, wait=args.wait, as_json=args.json,
                           out=sys.stdout)


COMMANDS: dict[str, Command] = {
    "whoami": whoami, "start": start, "stop": stop, "status": status, "list": list_,
    "logs": logs, "wait": wait, "run": run_, "submit": submit, "forget": forget,
    "queue": queue,
}
