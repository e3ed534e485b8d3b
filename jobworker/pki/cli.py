"""``jobworker-certs``: write a development PKI (a CA, a server certificate, client
certificates) with the certificate library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobworker import __version__
from jobworker.pki.certs import (
    CA_CERT,
    CA_KEY,
    DEFAULT_CA_DAYS,
    DEFAULT_LEAF_DAYS,
    MAX_DAYS,
    RESERVED_CLIENT_NAMES,
    ROLES,
    SERVER_CERT,
    SERVER_KEY,
    PKIError,
    load_ca,
    make_ca,
    make_client_cert,
    make_server_cert,
    parse_host,
    valid_client_name,
    write_cert,
    write_key,
)

PROG = "jobworker-certs"


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"days must be between 1 and {MAX_DAYS}")
    return days


def _host(text: str) -> str:
    try:
        parse_host(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _client_name(text: str) -> str:
    if not valid_client_name(text):
        raise argparse.ArgumentTypeError(
            f"invalid client name {text!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a"
            f" letter or digit, and not {' or '.join(sorted(RESERVED_CLIENT_NAMES))}"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create the certificates jobworker uses for mutual TLS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create a CA and a server certificate",
        description=(
            f"Create DIR (mode 0700) holding {CA_CERT}, {CA_KEY}, {SERVER_CERT} and {SERVER_KEY}."
            " The server certificate names localhost, 127.0.0.1 and ::1 plus each --host."
        ),
    )
    init.add_argument("dir", metavar="DIR", type=Path)
    init.add_argument(
        "--host",
        action="append",
        default=[],
        type=_host,
        metavar="NAME",
        help="extra DNS name or IP address for the server certificate (repeatable)",
    )
    init.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_LEAF_DAYS,
        help=f"server certificate lifetime (default {DEFAULT_LEAF_DAYS}; the CA gets"
        f" {DEFAULT_CA_DAYS} or this, whichever is longer)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")

    client = commands.add_parser(
        "client",
        help="create a client certificate signed by the CA",
        description=f"Write DIR/NAME.pem and DIR/NAME.key, signed by DIR/{CA_CERT}.",
    )
    client.add_argument("dir", metavar="DIR", type=Path)
    client.add_argument("name", metavar="NAME", type=_client_name, help="identity (the CN)")
    role = client.add_mutually_exclusive_group()
    role.add_argument(
        "--role", choices=ROLES, default="user", help="role, stored as the OU (default user)"
    )
    role.add_argument(
        "--no-role", action="store_true", help="omit the OU (the daemon will refuse it)"
    )
    client.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_LEAF_DAYS,
        help=f"lifetime (default {DEFAULT_LEAF_DAYS})",
    )
    return parser


def _cmd_init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if directory.exists() and not directory.is_dir():
        raise PKIError(f"{directory} exists and is not a directory")
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    if (directory / CA_KEY).exists() and not args.force:
        raise PKIError(f"{directory / CA_KEY} already exists; use --force to replace the CA")
    ca_key, ca_cert = make_ca(days=max(DEFAULT_CA_DAYS, args.days))
    server_key, server_cert = make_server_cert(ca_key, ca_cert, args.host, days=args.days)
    write_key(directory / CA_KEY, ca_key)
    write_cert(directory / CA_CERT, ca_cert)
    write_key(directory / SERVER_KEY, server_key)
    write_cert(directory / SERVER_CERT, server_cert)
    print(f"wrote {CA_CERT}, {CA_KEY}, {SERVER_CERT} and {SERVER_KEY} in {directory}")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    ca_key, ca_cert = load_ca(directory)
    role = None if args.no_role else args.role
    key, cert = make_client_cert(ca_key, ca_cert, args.name, role=role, days=args.days)
    write_key(directory / f"{args.name}.key", key)
    write_cert(directory / f"{args.name}.pem", cert)
    print(f"wrote {args.name}.pem and {args.name}.key in {directory}")
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Run ``jobworker-certs``; return the exit status (2 for usage errors, 1 for failures)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits for --help and usage errors; callers get a status
        return e.code if isinstance(e.code, int) else 2
    handler = {"init": _cmd_init, "client": _cmd_client}[args.command]
    try:
        return handler(args)
    except (PKIError, OSError, ValueError, TypeError, OverflowError) as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug, but the promise is one line, no traceback
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
