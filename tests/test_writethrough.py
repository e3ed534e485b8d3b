"""write_through: bytes leave at once when nothing is queued, never overtake queued bytes,
and leave errors to Twisted's usual path."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import abstract, main
from twisted.internet.testing import MemoryReactor, StringTransport

from jobworker.rpc.writethrough import write_through


class SocketTransport(abstract.FileDescriptor):
    """The parts of Twisted's TCP transport that matter here, on a real socket."""

    def __init__(self, sock: socket.socket, reactor: MemoryReactor) -> None:
        super().__init__(reactor)
        self.socket = sock
        self.connected = 1

    def fileno(self) -> int:
        return self.socket.fileno()

    def writeSomeData(self, data: bytes) -> int | BaseException:
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError:  # as tcp.Connection does
            return main.CONNECTION_LOST


@pytest.fixture
def pair() -> Iterator[tuple[SocketTransport, socket.socket, MemoryReactor]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    reactor = MemoryReactor()
    transport = SocketTransport(ours, reactor)
    assert write_through(transport)
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        assert chunk, "peer closed early"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_idle_write_is_sent_before_the_reactor_turns(pair) -> None:
    transport, theirs, reactor = pair
    transport.write(b"hello")
    assert read_exactly(theirs, 5) == b"hello"
    assert transport not in reactor.getWriters()  # nothing left for doWrite


def test_queued_bytes_are_never_overtaken(pair) -> None:
    transport, theirs, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096  # 1 MiB: more than the kernel takes at once
    transport.write(big)
    assert transport in reactor.getWriters()  # the rest is queued
    received = bytearray(theirs.recv(1 << 16))  # the socket has room again...
    transport.write(b"tail")  # ...but this must go behind the queued rest
    while len(received) < len(big) + 4:
        if transport in reactor.getWriters():
            transport.doWrite()
        received += theirs.recv(1 << 16)
    assert bytes(received) == big + b"tail"
    assert transport not in reactor.getWriters()
    transport.write(b"again")  # drained: straight out again
    assert read_exactly(theirs, 5) == b"again"
    assert transport not in reactor.getWriters()


def test_a_dead_peer_is_left_to_twisteds_doWrite(pair) -> None:
    transport, theirs, reactor = pair
    theirs.close()
    transport.write(b"x" * 100)  # EPIPE inside: no exception here
    transport.write(b"y" * 100)
    assert transport in reactor.getWriters()  # doWrite will meet the error and close
    assert transport.doWrite() is main.CONNECTION_LOST


def test_a_disconnecting_transport_queues(pair) -> None:
    transport, theirs, reactor = pair
    transport.disconnecting = True
    transport.write(b"late")
    assert transport in reactor.getWriters()
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(10)


def test_transports_without_socket_buffers_are_left_alone() -> None:
    transport = StringTransport()
    assert not write_through(transport)
    transport.write(b"kept")
    assert transport.value() == b"kept"


def test_installing_twice_keeps_one_layer(pair) -> None:
    transport, theirs, _ = pair
    first = transport.write
    assert write_through(transport)
    assert transport.write is first
    transport.write(b"once")
    assert read_exactly(theirs, 4) == b"once"
