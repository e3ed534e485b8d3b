"""One request in flight, as its handler sees it: who asked, and a way to stream chunks
back on the connection it came from."""

from __future__ import annotations

from typing import Any, Protocol

from jobworker.daemon.authz import Principal
from jobworker.daemon.fanout import StreamFanout
from jobworker.wire import codec
from jobworker.wire.codec import Encoded


class Connection(Protocol):
    """What a call needs of its connection (``RPCServerProtocol``)."""

    connected_and_open: bool
    streams: StreamFanout

    def send_encoded(self, *parts: bytes) -> None: ...

    def send_frame(self, value: dict[str, Any]) -> None: ...


class Call:
    """One request in flight: who asked, and a way to stream chunks back."""

    __slots__ = ("protocol", "id", "method", "who", "began")

    def __init__(self, protocol: Connection, rid: int, method: str, who: Principal,
                 began: float = 0.0) -> None:
        self.protocol = protocol
        self.id = rid
        self.method = method
        self.who = who
        #: When the request arrived (the reactor's clock): its latency is measured from it.
        self.began = began

    @property
    def connected(self) -> bool:
        return self.protocol.connected_and_open

    @property
    def streams(self) -> StreamFanout:
        """The connection's streams: a stream answering this call joins them."""
        return self.protocol.streams

    def send_chunk(self, chunk: Any) -> None:
        if type(chunk) is bytes:  # a log chunk: encoded around the bytes, not through them
            self.protocol.send_encoded(codec.encode_chunk_head(self.id, len(chunk)), chunk)
        elif type(chunk) is Encoded:
            self.protocol.send_encoded(codec.reply_head(self.id, "chunk"), chunk)
        else:
            self.protocol.send_frame({"id": self.id, "chunk": chunk})
