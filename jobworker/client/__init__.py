"""The client: its API, ``jwclient``'s parsing and commands, rendering and batch files.

``from jobworker.client import Client`` is the synchronous API (docs/api.md).  Names are
imported on first use, so that ``jwclient``'s argument parsing pays for none of them.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Client": "jobworker.client.sync",
    "LogStream": "jobworker.client.sync",
    "start_params": "jobworker.client.sync",
    "ClientConfig": "jobworker.client.endpoint",
    "ClientError": "jobworker.client.endpoint",
    "JobRecord": "jobworker.wire.record",
    **{name: "jobworker.wire.errors" for name in (
        "JobWorkerError", "BadRequest", "FrameTooLarge", "UnknownMethod",
        "UnsupportedVersion", "NotFound", "Forbidden", "Unavailable", "ConnectionLost",
        "Internal")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jobworker.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
