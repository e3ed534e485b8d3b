"""One connection's streams behind its transport: the transport's single push producer,
passing its pause and resume on to every log stream in flight.

So a slow reader makes the daemon stop reading log files instead of buffering them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class StreamFanout:
    """Registered with a connection's transport; ``add`` and ``remove`` the streams
    (themselves push producers) that write to it."""

    def __init__(self) -> None:
        #: Whether the transport has asked us to stop producing.
        self.paused = False
        # Ordered, so resuming can rotate through the streams fairly.
        self._streams: dict[Any, None] = {}
        self._resume_from = 0

    def add(self, stream: Any) -> None:
        """A stream starts writing to the transport; paused at once if the transport is."""
        self._streams[stream] = None
        if self.paused:
            stream.pauseProducing()

    def remove(self, stream: Any) -> None:
        self._streams.pop(stream, None)

    def stop_all(self) -> None:
        """Stop every stream and forget them (the connection is closing)."""
        streams, self._streams = list(self._streams), {}
        for stream in streams:
            stream.stopProducing()

    # -- IPushProducer, as the transport drives it ----------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        for stream in list(self._streams):
            stream.pauseProducing()

    def resumeProducing(self) -> None:
        """Resume streams one after another until the transport is full again.

        The TLS transport reports a pause only once, so a stream resumed after the
        transport filled up would read its whole file into the buffer; stop at the first
        pause instead, and start the next resume one stream further on so none starves.
        """
        self.paused = False
        streams = list(self._streams)
        if not streams:
            return
        start = self._resume_from % len(streams)
        self._resume_from = start + 1
        for stream in streams[start:] + streams[:start]:
            if self.paused:
                break
            stream.resumeProducing()

    def stopProducing(self) -> None:
        for stream in list(self._streams):
            stream.stopProducing()
