"""Length-prefixed frames on a Twisted stream, under both daemon and client.

A frame is a 4-byte big-endian length and one msgpack map (``jobworker.wire.frames``).
Reassembly is linear in the bytes received: Twisted's ``IntNStringReceiver`` copies its
whole buffer for every piece that arrives, so this is a ``Protocol`` with its own buffer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol

from jobworker.wire import codec
from jobworker.wire.errors import FrameTooLarge
from jobworker.wire.frames import CLIENT_MAX_FRAME, DEFAULT_MAX_FRAME, PREFIX


class FrameProtocol(Protocol):
    """Frames in and out, with a linear-time buffer, a cap on what arrives
    (``MAX_LENGTH``) and replies gathered per read (``flush``)."""

    MAX_LENGTH = DEFAULT_MAX_FRAME
    #: Largest payload we will send; a bigger one is a bug on our side.
    max_send = CLIENT_MAX_FRAME

    _buffer: bytearray
    _refusing = False
    #: A frame at least this long that is not complete yet is gathered as a list of the
    #: pieces that arrive and joined once when whole: one copy of a 256 KiB log chunk
    #: instead of two, and no bytearray regrowing (and reallocating) under it.
    LARGE_FRAME = 64 * 1024
    _pieces: list[bytes | memoryview] | None = None
    _gathered = 0  # bytes of the large frame's payload in _pieces
    _missing = 0  # bytes of it still to come
    # TLS transports carry more than ITransport declares (getPeerCertificate,
    # abortConnection, producers): typed loosely rather than cast at every use.
    transport: Any

    def makeConnection(self, transport: Any) -> None:
        self._buffer = bytearray()
        super().makeConnection(transport)

    def stringReceived(self, string: bytes | bytearray) -> None:
        """Override: one whole frame's payload has arrived."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        """Override: a frame's length prefix is over ``MAX_LENGTH``; nothing more of this
        connection is read.  By default, close it."""
        self.transport.loseConnection()

    #: Replies made while handling one read are gathered and written together (one TLS
    #: record instead of one per reply), up to this many bytes at a time; beyond it they
    #: go out at once, so a paused transport still pushes back on a streaming producer.
    OUTBOX_LIMIT = 64 * 1024
    _outbox: list[bytes] | None = None
    _outbox_size = 0

    #: Data that arrived while frames are held (``hold``), taken in order on ``release``.
    _held: list[bytes] | None = None

    def hold(self) -> None:
        """Take no more frames off the buffer, and stop reading the transport, until
        ``release``: for a peer that is not reading what we send, so that its requests
        wait in its own socket instead of as replies in our memory."""
        if self._held is None:
            self._held = []
            self.transport.pauseProducing()

    def release(self) -> None:
        """Take frames again, first those that arrived while held, and read on."""
        held, self._held = self._held, None
        if held is None or self.transport is None:
            return
        self.transport.resumeProducing()
        self.dataReceived(b"".join(held))

    def dataReceived(self, data: bytes) -> None:
        if self._outbox is not None:  # re-entered from a callback: already gathering
            self._receive(data)
            return
        self._outbox = []
        try:
            self._receive(data)
        finally:
            self.flush()

    def flush(self) -> None:
        """Write what has been gathered, and stop gathering."""
        out, self._outbox, self._outbox_size = self._outbox, None, 0
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def _receive(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._held is not None:
            if data:
                self._held.append(data)
            return
        progressed = False
        if self._pieces is not None:
            if len(data) < self._missing:
                self._pieces.append(data)
                self._gathered += len(data)
                self._missing -= len(data)
                self.buffer_changed(4 + self._gathered, False)
                return
            pieces, self._pieces = self._pieces, None
            frame: bytes | bytearray
            with memoryview(data) as view:
                pieces.append(view[:self._missing])
                frame = b"".join(pieces)
                data = bytes(view[self._missing:]) if len(data) > self._missing else b""
            self._gathered = self._missing = 0
            progressed = True
            self.stringReceived(frame)
            if self.transport is None or self.transport.disconnecting:
                self.buffer_changed(0, True)
                return
        buf = self._buffer
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= 4 and self._held is None:
            (length,) = PREFIX.unpack_from(buf, offset)
            if length > self.MAX_LENGTH:
                # The stream cannot be resynchronised: drop the rest of it.
                self._refusing = True
                del buf[:]
                self.lengthLimitExceeded(length)
                return
            end = offset + 4 + length
            if end > size:
                if length >= self.LARGE_FRAME:
                    self._pieces = [bytes(buf[offset + 4:])]
                    self._gathered = size - offset - 4
                    self._missing = length - self._gathered
                    del buf[:]
                    self.buffer_changed(4 + self._gathered, progressed or offset > 0)
                    return
                break
            # A bytearray slice is one copy, and several times cheaper than bytes() of a
            # memoryview slice for the small frames that dominate.
            frame = buf[offset + 4:end]
            offset = end
            self.stringReceived(frame)
            if self.transport is None or self.transport.disconnecting:
                break
        # Deleting a prefix of a bytearray is cheap: CPython moves its start pointer.
        del buf[:offset]
        # Whole frames waiting while held are not a peer's unfinished frame.
        self.buffer_changed(len(buf) if self._held is None else 0, progressed or offset > 0)

    def buffer_changed(self, pending: int, progressed: bool) -> None:
        """Hook: ``pending`` bytes of an incomplete frame are buffered; ``progressed``
        says whether at least one whole frame was taken off the buffer."""

    def send_frame(self, value: dict[str, Any]) -> None:
        self.send_encoded(codec.encode(value))

    def send_encoded(self, *parts: bytes) -> None:
        """Send one frame whose payload is ``parts`` joined: already-encoded msgpack."""
        size = sum(map(len, parts))
        if size > self.max_send:
            raise FrameTooLarge(f"refusing to send a {size}-byte frame")
        if self._outbox is None:
            self.transport.writeSequence([PREFIX.pack(size), *parts])
            return
        self._outbox.append(PREFIX.pack(size))
        self._outbox.extend(parts)
        self._outbox_size += 4 + size
        if self._outbox_size >= self.OUTBOX_LIMIT:
            out, self._outbox, self._outbox_size = self._outbox, [], 0
            self.transport.writeSequence(out)
