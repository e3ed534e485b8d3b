"""Peers and listening addresses as people write them: ``host:port``, ``[::1]:port``."""

from __future__ import annotations

from typing import Any


def host_port(address: Any) -> str:
    """``127.0.0.1:8443`` for IPv4, ``[::1]:8443`` for IPv6, the path of a UNIX socket,
    and ``str(address)`` for anything else (never a repr of a Twisted address type)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, (str, bytes)):
        return name.decode(errors="replace") if isinstance(name, bytes) else name
    return str(address)
