"""TLS transports that write at once: the daemon's listener factory and the client's
endpoint, both on ``PromptTLSProtocol``."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.rpc.writethrough import undo_write_through, write_through


class PromptTLSProtocol(TLSMemoryBIOProtocol):
    """TLS that sends each write as soon as it is made, on both sides of the RPC.

    Twisted's default (``BufferingTLSTransport``) holds every write until the next
    reactor iteration, to merge many small writes into one TLS record, and the socket
    transport under it holds the record until the iteration after that.  Our peers
    already write all the frames one read produced in a single call (see
    ``FrameProtocol.flush``), so both waits only cost timed calls and reactor passes:
    the first was about 8% of the ``status`` rate (``bench/rpc.py``); for the second see
    ``jobworker.rpc.writethrough``.
    """

    def makeConnection(self, transport: ITransport) -> None:
        write_through(transport)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        # Ciphertext first: a protocol that times unfinished frames must also see bytes
        # that do not (yet) make a whole TLS record, which decrypt to nothing.
        notice = getattr(self.wrappedProtocol, "ciphertext_received", None)
        if notice is not None:
            notice()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.transport is not None:
            undo_write_through(self.transport)
        super().connectionLost(reason)


class ServerTLSFactory(TLSMemoryBIOFactory):
    """TLS for the daemon's listener (see PromptTLSProtocol)."""

    protocol = PromptTLSProtocol


class ClientTLSFactory(TLSMemoryBIOFactory):
    """TLS for the client's connection (see PromptTLSProtocol)."""

    protocol = PromptTLSProtocol


@implementer(IStreamClientEndpoint)
class ClientTLSEndpoint:
    """``endpoints.wrapClientTLS`` with ClientTLSFactory in place of Twisted's buffering
    factory: connects ``wrapped``, then speaks TLS over it."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator,
                 wrapped: IStreamClientEndpoint) -> None:
        self._creator = creator
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = ClientTLSFactory(self._creator, True, protocolFactory)

        def unwrap(tls: Any) -> IProtocol:
            return cast(IProtocol, tls.wrappedProtocol)

        return self._wrapped.connect(factory).addCallback(unwrap)
