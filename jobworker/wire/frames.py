"""The frame format and the request envelope every frame carries.

A frame is a 4-byte big-endian length and one msgpack map; a request map holds ``id``,
``method`` and optionally ``params`` (see docs/protocol.md).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from jobworker.wire.errors import BadRequest

#: The length prefix of every frame.
PREFIX = struct.Struct("!I")
#: Default cap on one frame's payload; the daemon's ``--max-frame``.
DEFAULT_MAX_FRAME = 64 * 1024
#: A client accepts larger frames than a server: log chunks are up to 256 KiB.
CLIENT_MAX_FRAME = 1024 * 1024
#: Request ids are integers from 0 to this (exclusive), exact in every JSON number.
MAX_ID = 2**53


class Request(NamedTuple):
    """One request's envelope (a NamedTuple: built for every frame, so kept cheap)."""

    id: int
    method: str
    params: dict[str, Any]


_ENVELOPE = frozenset({"id", "method", "params"})
_new_request = tuple.__new__


def _check_id(frame: dict[str, Any]) -> int:
    rid = frame.get("id")
    if type(rid) is not int or not 0 <= rid < MAX_ID:
        raise BadRequest("'id' must be an integer from 0 to 2**53")
    return rid


def parse_request(value: Any) -> Request:
    """Check the envelope of a request frame."""
    # The common case in one test: a map of exactly id, method and (optionally) params.
    if type(value) is dict:
        rid, method = value.get("id"), value.get("method")
        params = value.get("params")
        if (type(rid) is int and 0 <= rid < MAX_ID and type(method) is str
                and 0 < len(method) <= 64
                and (type(params) is dict if params is not None else len(value) == 2)
                and len(value) <= 3):
            # tuple.__new__ builds the NamedTuple in C; its own __new__ is a Python frame.
            return _new_request(Request, (rid, method, {} if params is None else params))
    return _parse_request_slowly(value)


def _parse_request_slowly(value: Any) -> Request:
    """``parse_request`` for anything off the common path: the precise error."""
    if not isinstance(value, dict):
        raise BadRequest("a frame must be a map")
    rid = _check_id(value)
    if not value.keys() <= _ENVELOPE:
        extra = set(value) - _ENVELOPE
        raise BadRequest(f"unexpected request fields: {', '.join(sorted(map(str, extra)))}")
    method = value.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 64:
        raise BadRequest("'method' must be a non-empty string")
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest("'params' must be a map")
    return Request(rid, method, params)


def request_id_of(value: Any) -> int | None:
    """Best-effort id of a malformed request, so its error can still be correlated."""
    if isinstance(value, dict):
        rid = value.get("id")
        if type(rid) is int and 0 <= rid < MAX_ID:
            return rid
    return None
