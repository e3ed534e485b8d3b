"""An asynchronous Twisted client: connect with mutual TLS, say hello, call methods.

For Twisted programs (the tests and benchmarks drive daemons with it); ``jwclient`` and
the documented API are the synchronous ``jobworker.client.Client``, which imports no
Twisted.  Takes the reactor as a parameter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError

from jobworker.client.endpoint import DEFAULT_SERVER, ClientConfig, ClientError, parse_server
from jobworker.client.sync import start_params
from jobworker.rpc.correlation import RPCClientProtocol
from jobworker.rpc.tls import ClientTLS
from jobworker.rpc.transport import ClientTLSEndpoint
from jobworker.wire.errors import ConnectionLost, JobWorkerError
from jobworker.wire.hello import hello_params
from jobworker.wire.record import JobRecord

__all__ = ["DEFAULT_SERVER", "Client", "ClientConfig", "ClientError", "connect",
           "parse_server"]

Records = list[JobRecord]


class Client:
    """A connected, hello'd session with the daemon."""

    def __init__(self, protocol: RPCClientProtocol, server_info: dict[str, Any],
                 config: ClientConfig | None = None) -> None:
        self.protocol = protocol
        self.server_info = server_info
        #: How this session was made: to make another after a dropped connection.
        self.config = config

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_chunk: Callable[[Any], None] | None = None) -> Deferred[Any]:
        return self.protocol.call(method, params, on_chunk)

    async def start(self, command: str, args: list[str] | None = None,
                    env: list[str] | None = None, dir: str | None = None,
                    timeout: float | None = None, request_id: str | None = None,
                    user: str | None = None, isolate: list[str] | None = None,
                    memory: int | None = None, cpu: float | None = None,
                    pids: int | None = None, io_read: int | None = None,
                    io_write: int | None = None, queue: str | None = None,
                    priority: int = 0, after: list[str | int] | None = None,
                    name: str | None = None, labels: list[str] | None = None
                    ) -> JobRecord:
        """``request_id``: a retry of this start with the same one returns the same job
        and runs nothing twice (the daemon keeps it, across restarts too).  ``isolate``:
        new namespaces for the job, of ``pid``, ``net``, ``mount``.  ``memory`` (bytes),
        ``cpu`` (cores), ``pids``, ``io_read`` and ``io_write`` (bytes per second): limits
        (docs/isolation.md).  ``queue``, ``priority``, ``after``, ``name``, ``labels``:
        scheduling (docs/jobs.md)."""
        params = start_params(command, args or [], env=env, dir=dir, timeout=timeout,
                              request_id=request_id, user=user, isolate=isolate,
                              memory=memory, cpu=cpu, pids=pids, io_read=io_read,
                              io_write=io_write, queue=queue, priority=priority or None,
                              after=after, name=name, labels=labels)
        return JobRecord.from_wire(await self.call("start", params))

    async def record(self, method: str, job: str | int, **extra: Any) -> JobRecord:
        params = {"job": job, **{k: v for k, v in extra.items() if v is not None}}
        return JobRecord.from_wire(await self.call(method, params))

    async def list(self, running: bool = False, **filters: Any) -> list[JobRecord]:
        """Every job that matches (``limit``, ``state``, ``owner``, ``since``, ``until``),
        newest first, page after page."""
        records: list[JobRecord] = []
        cursor = None
        while True:
            page, cursor = await self.list_page(running=running, cursor=cursor, **filters)
            records.extend(page)
            if cursor is None or "limit" in filters:
                return records

    async def list_page(self, running: bool = False, **params: Any
                        ) -> tuple[Records, str | None]:
        """One ``list`` reply: its records, and the cursor of the next page (None: last)."""
        records: list[JobRecord] = []
        sent = {"running": running, **{k: v for k, v in params.items() if v is not None}}
        final = await self.call("list", sent, lambda batch: records.extend(
            JobRecord.from_wire(r) for r in batch))
        cursor = final.get("next_cursor") if isinstance(final, dict) else None
        return records, cursor if isinstance(cursor, str) else None

    async def logs(self, job: str | int, sink: Callable[[bytes], None], stream: str = "stdout",
                   offset: int = 0, follow: bool = False) -> dict[str, Any]:
        def on_chunk(chunk: Any) -> None:
            if not isinstance(chunk, bytes):
                raise ConnectionLost("server sent a log chunk that is not bytes")
            sink(chunk)

        return await self.call("logs", {"job": job, "stream": stream, "offset": offset,
                                        "follow": follow}, on_chunk)

    def close(self) -> None:
        self.protocol.transport.loseConnection()


async def connect(reactor: Any, config: ClientConfig, timeout: float = 10.0) -> Client:
    """Connect, complete the TLS handshake and the protocol hello."""
    host, port = parse_server(config.server)
    try:
        tls = ClientTLS(config.ca, config.cert, config.key, host)
    except Exception as e:
        raise ClientError(str(e)) from None
    endpoint = ClientTLSEndpoint(
        tls, endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout))
    protocol = RPCClientProtocol()
    try:
        await endpoints.connectProtocol(endpoint, protocol)
    except (ConnectError, DNSLookupError) as e:
        raise ClientError(f"cannot connect to {config.server}: {_reason(e)}") from None
    except ValueError as e:  # HostnameEndpoint: "invalid hostname"
        raise ClientError(f"bad server address {config.server!r}: {e}") from None
    hello = protocol.call("hello", hello_params())
    hello.addTimeout(timeout, reactor)
    try:
        info = await hello
    except ConnectionLost as e:
        raise ClientError(f"{config.server}: TLS handshake or hello failed "
                          f"({_handshake_reason(e.message)})") from None
    except JobWorkerError as e:
        protocol.transport.loseConnection()
        raise ClientError(f"{config.server}: {e.message}") from None
    except Exception as e:  # timeout
        protocol.transport.abortConnection()
        raise ClientError(f"{config.server}: no answer within {timeout:g}s "
                          f"({type(e).__name__})") from None
    return Client(protocol, info, config)


def _reason(e: Exception) -> str:
    os_error = getattr(e, "osError", None)
    if isinstance(os_error, int):  # Twisted's TCP client gives the bare errno
        text = os.strerror(os_error)
    else:
        text = str(os_error) if os_error else str(e)
    return text.strip().rstrip(".") or type(e).__name__


def _handshake_reason(message: str) -> str:
    """Turn OpenSSL's error tuples into a short human reason."""
    lowered = message.lower()
    for needle, text in (
        ("does not match", message.replace("connection lost: ", "")),
        ("lacks the", message.replace("connection lost: ", "")),
        ("no extended key usage", message.replace("connection lost: ", "")),
        ("ca certificate", message.replace("connection lost: ", "")),
        ("certificate verify failed", "server certificate verify failed"),
        ("certificate required", "server requires a client certificate"),
        ("unknown ca", "server does not trust our certificate (unknown CA)"),
        ("certificate expired", "server refused our certificate: expired"),
        ("certificate revoked", "server refused our certificate: revoked"),
        ("bad certificate", "server refused our certificate"),
        ("unsupported certificate", "server refused our certificate (unsupported purpose)"),
        ("protocol version", "TLS version mismatch (TLS 1.3 required)"),
    ):
        if needle in lowered:
            return text
    return message.replace("connection lost: ", "")
