"""Parameter checks and the schema that validates one method's parameters: the one
validator of a request's values (daemon handlers see only what passed it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobworker.wire.errors import BadRequest

Check = Callable[[str, Any], Any]


def string(max_len: int = 4096, *, nonempty: bool = False, no_nul: bool = True) -> Check:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise BadRequest(f"'{name}' must be a string")
        if len(v) > max_len:
            raise BadRequest(f"'{name}' is longer than {max_len} characters")
        if nonempty and not v:
            raise BadRequest(f"'{name}' must not be empty")
        if no_nul and "\0" in v:
            raise BadRequest(f"'{name}' must not contain NUL")
        return v

    return check


def integer(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(name: str, v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise BadRequest(f"'{name}' must be an integer from {lo} to {hi}")
        return v

    return check


def number(lo: float = 0.0, hi: float = 10.0**9) -> Check:
    def check(name: str, v: Any) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi or v != v:
            raise BadRequest(f"'{name}' must be a number from {lo:g} to {hi:g}")
        return float(v)

    return check


def boolean() -> Check:
    def check(name: str, v: Any) -> bool:
        if type(v) is not bool:
            raise BadRequest(f"'{name}' must be true or false")
        return v

    return check


def one_of(*choices: str) -> Check:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise BadRequest(f"'{name}' must be one of: {', '.join(choices)}")
        return v

    return check


def list_of(item: Check, max_items: int = 1024) -> Check:
    def check(name: str, v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise BadRequest(f"'{name}' must be a list")
        if len(v) > max_items:
            raise BadRequest(f"'{name}' has more than {max_items} items")
        return [item(f"{name}[{i}]", x) for i, x in enumerate(v)]

    return check


def subset_of(*choices: str) -> Check:
    """A list of distinct strings, each one of ``choices``."""

    def check(name: str, v: Any) -> list[str]:
        if not isinstance(v, list) or any(x not in choices for x in v):
            raise BadRequest(f"'{name}' must be a list of: {', '.join(choices)}")
        if len(set(v)) != len(v):
            raise BadRequest(f"'{name}' names one of them twice")
        return list(v)

    return check


def mapping() -> Check:
    """A map, checked no further here (its handler validates each one)."""

    def check(name: str, v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise BadRequest(f"'{name}' must be a map")
        return v

    return check


def label() -> Check:
    """``key=value``: a key of letters, digits and ``._-/`` (1-63), a value of at most 256
    characters with no line break (a list filter matches whole labels)."""
    text = string(320, nonempty=True)

    def check(name: str, v: Any) -> str:
        key, sep, value = text(name, v).partition("=")
        if (not sep or not 0 < len(key) <= 63 or len(value) > 256
                or not all(c.isascii() and (c.isalnum() or c in "._-/") for c in key)
                or "\n" in value or "\r" in value):
            raise BadRequest(f"'{name}' must be key=value (a key of letters, digits and "
                             "._-/, up to 63; a value up to 256 characters, one line)")
        return v  # type: ignore[no-any-return]

    return check


def job_name() -> Check:
    """A job's name: 1-128 characters, one line, not all digits (those name a pid)."""
    text = string(128, nonempty=True)

    def check(name: str, v: Any) -> str:
        value: str = text(name, v)
        if value.isdecimal() or "\n" in value or "\r" in value:
            raise BadRequest(f"'{name}' must be one line, and not all digits")
        return value

    return check


def job_ref() -> Check:
    """A job id (string) or a pid (integer)."""
    as_str, as_int = string(64, nonempty=True), integer(1, 2**31)

    def check(name: str, v: Any) -> str | int:
        # Every job method checks one: the usual id is accepted without further calls.
        if type(v) is str and 0 < len(v) <= 64 and "\0" not in v:
            return v
        return as_int(name, v) if type(v) is int else as_str(name, v)

    return check


@dataclass(frozen=True)
class Schema:
    """Required and optional parameters of one method; unknown keys are refused."""

    required: dict[str, Check]
    optional: dict[str, tuple[Check, Any]]
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every request goes through validate: its set of known names is built once.
        object.__setattr__(self, "_known", frozenset(self.required) | frozenset(self.optional))

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if not params.keys() <= self._known:
            unknown = set(params) - self._known
            raise BadRequest(f"unknown parameters: {', '.join(sorted(map(str, unknown)))}")
        out: dict[str, Any] = {}
        for name, check in self.required.items():
            if name not in params:
                raise BadRequest(f"missing parameter '{name}'")
            out[name] = check(name, params[name])
        for name, (check, default) in self.optional.items():
            v = params.get(name)
            out[name] = default if v is None else check(name, v)
        return out


def schema(required: dict[str, Check] | None = None,
           optional: dict[str, tuple[Check, Any]] | None = None) -> Schema:
    return Schema(required or {}, optional or {})
