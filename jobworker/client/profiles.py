"""jwclient's configuration file: named workers, a default one, and how a setting is
chosen among a flag, its environment variable, the worker's entry and the default.

``$XDG_CONFIG_HOME/jobworker/client.toml`` (or ``--config`` / ``$JWCLIENT_CONFIG``)::

    default = "build1"

    [worker.build1]
    server = "build1.example.com:8443"
    pki = "pki"                  # relative paths are relative to this file's folder
    identity = "ci"

    [worker.build2]
    server = "10.0.0.7:8443"
    ca = "ca.pem"
    cert = "ci.pem"
    key = "ci.key"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobworker.client.endpoint import DEFAULT_SERVER, ClientConfig

#: Each setting a worker entry may hold, and its environment variable.
SETTINGS = {"server": "JWCLIENT_SERVER", "pki": "JWCLIENT_PKI",
            "identity": "JWCLIENT_IDENTITY", "ca": "JWCLIENT_CA", "cert": "JWCLIENT_CERT",
            "key": "JWCLIENT_KEY"}
_PATHS = ("pki", "ca", "cert", "key")


class ProfileError(Exception):
    """The configuration file is unreadable or malformed, or names no such worker."""


@dataclass(frozen=True)
class Profiles:
    """The workers of a configuration file (none without one)."""

    path: str | None = None
    default: str | None = None
    workers: dict[str, dict[str, str]] = field(default_factory=dict)


def config_path(flag: str | None, env: Mapping[str, str]) -> tuple[str | None, bool]:
    """Which file to read, and whether it was asked for (then it must exist)."""
    if flag:
        return os.path.expanduser(flag), True
    if env.get("JWCLIENT_CONFIG"):
        return os.path.expanduser(env["JWCLIENT_CONFIG"]), True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobworker", "client.toml"), False


def load(path: str | None, required: bool) -> Profiles:
    """Read ``path``; an absent file that was not asked for is no workers at all."""
    if path is None:
        return Profiles()
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ProfileError(f"no configuration file {path}") from None
        return Profiles()
    except OSError as e:
        raise ProfileError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path} is not valid TOML: {e}") from None
    unknown = set(data) - {"default", "worker"}
    if unknown:
        raise ProfileError(f"{path}: unknown keys {', '.join(sorted(unknown))} (only "
                           "default and [worker.NAME] tables)")
    default = data.get("default")
    tables = data.get("worker", {})
    if default is not None and not isinstance(default, str):
        raise ProfileError(f"{path}: default must be a worker's name")
    if not isinstance(tables, dict):
        raise ProfileError(f"{path}: worker must be tables [worker.NAME]")
    folder = os.path.dirname(os.path.abspath(path))
    workers: dict[str, dict[str, str]] = {}
    for name, entry in tables.items():
        if not isinstance(entry, dict):
            raise ProfileError(f"{path}: [worker.{name}] must be a table")
        bad = set(entry) - set(SETTINGS)
        if bad:
            raise ProfileError(f"{path}: [worker.{name}]: unknown keys "
                               f"{', '.join(sorted(bad))}")
        if not all(isinstance(v, str) and v for v in entry.values()):
            raise ProfileError(f"{path}: [worker.{name}]: every value must be a string")
        workers[name] = {k: os.path.join(folder, os.path.expanduser(v)) if k in _PATHS else v
                         for k, v in entry.items()}
    if default is not None and default not in workers:
        raise ProfileError(f"{path}: default names no worker: {default!r}")
    return Profiles(path, default, workers)


def chosen(profiles: Profiles, flag: str | None, env: Mapping[str, str]) -> str | None:
    """The worker named by --worker, else $JWCLIENT_WORKER, else the file's default."""
    name = flag or env.get("JWCLIENT_WORKER") or profiles.default
    if name is not None and name not in profiles.workers:
        where = f" in {profiles.path}" if profiles.workers else \
            " (no workers are configured)"
        raise ProfileError(f"no worker {name!r}{where}")
    return name


def settings(flags: Mapping[str, str | None], env: Mapping[str, str],
             entry: Mapping[str, str]) -> dict[str, str | None]:
    """Each setting: its flag, else its environment variable, else the worker's entry,
    else the default (the server's only)."""
    out: dict[str, str | None] = {}
    for name, variable in SETTINGS.items():
        out[name] = flags.get(name) or env.get(variable) or entry.get(name)
    out["server"] = out["server"] or DEFAULT_SERVER
    return out


def client_config(values: Mapping[str, str | None]) -> tuple[ClientConfig | None, str]:
    """The config these settings make, or None and what is missing."""
    ca, cert, key = values["ca"], values["cert"], values["key"]
    pki, identity = values["pki"], values["identity"]
    if pki:
        if not identity and not (cert and key):
            return None, "--pki needs --identity NAME"
        ca = ca or os.path.join(pki, "ca.pem")
        if identity:
            cert = cert or os.path.join(pki, f"{identity}.pem")
            key = key or os.path.join(pki, f"{identity}.key")
    missing = [n for n, v in (("--ca", ca), ("--cert", cert), ("--key", key)) if not v]
    if missing or not ca or not cert or not key:
        return None, f"{', '.join(missing)} required (or --pki DIR --identity NAME)"
    for what, path in (("CA file", ca), ("certificate", cert), ("private key", key)):
        if not os.path.isfile(path):
            return None, f"no {what} {path}"
    return ClientConfig(str(values["server"]), ca, cert, key), ""
