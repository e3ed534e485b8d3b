"""What every streamed reply shares: a push producer behind its connection
(``StreamFanout``) that sends one chunk at a time while the transport takes them."""

from __future__ import annotations

from jobworker.daemon.call import Call


class ReplyStream:
    """Sends chunks of one reply to ``call`` while the connection is not paused.

    Subclasses send one chunk in ``_send_next`` (False: nothing more to send for now, or
    the stream has finished) and let go of what they hold in ``_release``.
    """

    def __init__(self, call: Call) -> None:
        self._call = call
        self._paused = False
        self._pumping = False
        self._closed = False

    def _send_next(self) -> bool:
        raise NotImplementedError

    def _release(self) -> None:
        """Let go of files, watches and observers; called once, when the stream closes."""

    def _pump(self) -> None:
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            while not self._paused and not self._closed:
                if not self._send_next():
                    return
                # The connection passes on only its first pause: if another stream on it
                # filled the transport before we were resumed, this chunk was our share,
                # and we wait for the next resume like the others.
                if self._call.streams.paused:
                    self._paused = True
        finally:
            self._pumping = False

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        self._call.streams.remove(self)

    # IPushProducer, driven by the connection.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._close()
