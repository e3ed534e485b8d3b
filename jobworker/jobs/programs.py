"""Finding what a job runs: its working directory and its program, the way a shell would,
with errors a client can act on."""

from __future__ import annotations

import os
import stat


class SpawnError(Exception):
    """The job cannot be started; ``message`` says why in words a client can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def check_directory(path: str) -> None:
    """Raise SpawnError unless ``path`` is an existing directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpawnError(f"no such directory: {path}") from None
    except OSError as e:
        raise SpawnError(f"cannot use directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpawnError(f"not a directory: {path}")


def resolve_program(command: str, path_env: str, cwd: str | None = None) -> str:
    """The absolute executable for ``command``, the way a shell would find it.

    A command containing "/" is taken as a path (relative to the job's ``cwd``); any other is
    searched in ``path_env``.  Only absolute PATH entries are searched: a relative entry
    would depend on the directory, which is surprising for a remote caller.
    """
    if not command:
        raise SpawnError("no such program: ''")
    if "\0" in command:
        raise SpawnError("program name contains a NUL byte")
    base = cwd if cwd is not None else os.getcwd()
    if "/" in command:
        path = os.path.normpath(os.path.join(base, command))
        _check_executable(path, command)
        return path
    refused: SpawnError | None = None
    for entry in path_env.split(":"):
        if not os.path.isabs(entry):
            continue
        candidate = os.path.join(entry, command)
        try:
            _check_executable(candidate, command)
        except SpawnError as e:
            if refused is None and os.path.lexists(candidate):
                refused = e
            continue
        return candidate
    raise refused or SpawnError(f"no such program: {command}")


def _check_executable(path: str, command: str) -> None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SpawnError(f"no such program: {command}") from None
    except OSError as e:
        raise SpawnError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpawnError(f"not a regular file: {path}")
    if not os.access(path, os.X_OK):
        raise SpawnError(f"not executable: {path}")
