"""The hello that opens every connection: what a client sends, what the daemon answers,
and the version rule both sides apply."""

from __future__ import annotations

from typing import Any

from jobworker import PROTOCOL_VERSION, __version__
from jobworker.wire.errors import UnsupportedVersion

#: Our own name and version, as the hello carries it either way.
SOFTWARE = f"jobworker/{__version__}"


def hello_params() -> dict[str, Any]:
    """A client's hello parameters."""
    return {"version": PROTOCOL_VERSION, "client": SOFTWARE}


def check_version(version: int) -> None:
    """Raise L{UnsupportedVersion} unless a peer's hello names our protocol version."""
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"client speaks protocol version {version}; this daemon speaks "
            f"version {PROTOCOL_VERSION}: upgrade the older side")


def hello_result(max_frame: int) -> dict[str, Any]:
    """The daemon's answer to a hello it accepted."""
    return {"version": PROTOCOL_VERSION, "server": SOFTWARE, "max_frame": max_frame}


def hello_first() -> UnsupportedVersion:
    """The error for any request made before the hello."""
    return UnsupportedVersion(f"send hello with protocol version {PROTOCOL_VERSION} first")
