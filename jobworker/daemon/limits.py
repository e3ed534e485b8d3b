"""Per-connection protections: the one home of their defaults, used by the connection
protocol and by ``twistd jobworker``'s options alike."""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.wire.frames import DEFAULT_MAX_FRAME


@dataclass(frozen=True)
class Limits:
    """Per-connection protections; all times in seconds."""

    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: Time allowed to finish a frame once its first byte arrived, so a client
    #: dripping bytes cannot hold a connection open while requests are in flight.
    frame_timeout: float = 30.0
    max_connections: int = 1024
    #: Requests one connection may have in flight at once.
    max_in_flight: int = 256
    #: Connections still in their TLS handshake: a pool of their own, so that sockets
    #: that never authenticate cannot take the authenticated ones' places.
    max_handshakes: int = 4096
    #: Log streams (each holding an open log file) on one connection, and for one
    #: identity over all its connections.
    max_streams_per_connection: int = 64
    max_streams_per_identity: int = 512


#: The defaults, for option parsers and documentation.
DEFAULTS = Limits()
