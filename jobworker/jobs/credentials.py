"""Whom a job runs as: the credentials its process gets, switched on the spawning thread
only.

``posix_spawn`` has no uid or gid attributes.  Linux keeps credentials per thread, and the
raw ``setgroups``/``setresgid``/``setresuid`` system calls change only the calling thread
(glibc's wrappers, and so ``os.setresuid``, change every thread of the process).  So the
reactor thread takes the job's credentials just for the spawn, keeping saved uid 0 to
come back, and the child starts with them; the daemon's other threads never change.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# System call numbers by architecture: setgroups, setresuid, setresgid.
_SYSCALLS = {
    "x86_64": (116, 117, 119),
    "aarch64": (159, 147, 149),
}


@dataclass(frozen=True)
class Credentials:
    """A job's user: ids, supplementary groups, and what its environment says."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str
    home: str


class CredentialsError(Exception):
    """The credentials could not be taken (the job fails with this)."""


def can_switch() -> bool:
    """Whether this process can run jobs as other users (it is root, on a known arch)."""
    return os.geteuid() == 0 and platform.machine() in _SYSCALLS


_libc = ctypes.CDLL(None, use_errno=True)


def _call(number: int, *args: object) -> None:
    if _libc.syscall(number, *args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _setgroups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _call(_SYSCALLS[platform.machine()][0], ctypes.c_size_t(len(groups)), array)


def _setresuid(r: int, e: int, s: int) -> None:
    _call(_SYSCALLS[platform.machine()][1], ctypes.c_uint(r), ctypes.c_uint(e), ctypes.c_uint(s))


def _setresgid(r: int, e: int, s: int) -> None:
    _call(_SYSCALLS[platform.machine()][2], ctypes.c_uint(r), ctypes.c_uint(e), ctypes.c_uint(s))


@contextmanager
def acting_as(creds: Credentials | None) -> Iterator[None]:
    """The calling thread runs as ``creds`` inside the block (None: unchanged), and as
    root again after it, whatever happens.  Only for a root daemon (``can_switch``)."""
    if creds is None:
        yield
        return
    groups = tuple(os.getgroups())
    gid = os.getegid()
    try:
        _setgroups(creds.groups)
        _setresgid(creds.gid, creds.gid, gid)
        _setresuid(creds.uid, creds.uid, 0)  # saved uid 0: the way back
    except OSError as e:
        _restore(groups, gid)
        raise CredentialsError(f"cannot take uid {creds.uid} gid {creds.gid}: "
                               f"{e.strerror}") from None
    try:
        yield
    finally:
        _restore(groups, gid)


def _restore(groups: tuple[int, ...], gid: int) -> None:
    _setresuid(0, 0, 0)
    _setresgid(gid, gid, gid)
    _setgroups(groups)
