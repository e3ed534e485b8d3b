"""Where a client connects and with which files: the server address and the TLS
credentials, with no network or Twisted in it (shared by both clients and the CLI)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_SERVER = "127.0.0.1:8443"


class ClientError(Exception):
    """Anything that keeps the client from getting an answer, with a one-line message."""


def parse_server(server: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 8443)."""
    host, port = server, "8443"
    if server.startswith("["):
        end = server.find("]")
        if end < 0:
            raise ClientError(f"bad server address {server!r}")
        host, rest = server[1:end], server[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ClientError(f"bad server address {server!r}")
            port = rest[1:]
    elif server.count(":") == 1:
        host, port = server.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"bad server address {server!r}: expected HOST:PORT")
    if not (_HOSTNAME.fullmatch(host) or ":" in host and server.startswith("[")):
        raise ClientError(f"bad server address {server!r}: {host!r} is not a host name")
    return host, int(port)


#: A DNS name or an IPv4 address: dot-separated labels of letters, digits and hyphens.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True)
class ClientConfig:
    """A daemon's address and the CA, certificate and key to reach it with."""

    server: str
    ca: str
    cert: str
    key: str

    @classmethod
    def from_pki(cls, server: str, pki: str, identity: str) -> ClientConfig:
        return cls(server, os.path.join(pki, "ca.pem"), os.path.join(pki, f"{identity}.pem"),
                   os.path.join(pki, f"{identity}.key"))
