"""One connection's streams behind its transport: the transport's single push producer,
passing its pause and resume on to every log stream in flight.

So a slow reader makes the daemon stop reading log files instead of buffering them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


def _nothing() -> None:
    pass


@implementer(IPushProducer)
class StreamFanout:
    """Registered with a connection's transport; ``add`` and ``remove`` the streams
    (themselves push producers) that write to it.

    ``on_pause`` and ``on_resume`` tell the connection too, so that it stops taking
    requests while its replies are not being read, and takes them again first on resume.
    """

    def __init__(self, on_pause: Callable[[], None] = _nothing,
                 on_resume: Callable[[], None] = _nothing) -> None:
        self._on_pause = on_pause
        self._on_resume = on_resume
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

    def close(self) -> None:
        """The connection is gone: stop every stream and let go of the connection's
        callbacks (they hold it: a cycle only the garbage collector would free)."""
        self.stop_all()
        self._on_pause = self._on_resume = _nothing

    # -- IPushProducer, as the transport drives it ----------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        for stream in list(self._streams):
            stream.pauseProducing()
        self._on_pause()

    def resumeProducing(self) -> None:
        """Resume streams one after another until the transport is full again.

        The TLS transport reports a pause only once, so a stream resumed after the
        transport filled up would read its whole file into the buffer; stop at the first
        pause instead, and start the next resume one stream further on so none starves.
        """
        self.paused = False
        self._on_resume()
        streams = list(self._streams)
        if not streams or self.paused:
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
