"""jwclient: schedule jobs on jobworker daemons and fetch their results and logs.

Imports stay lean: parsing needs argparse alone; a command adds ``ssl``, ``socket`` and
``msgpack`` (jobworker.client.session), never Twisted.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, NoReturn

from jobworker import __version__
from jobworker.wire.record import ISOLATE, STATES
from jobworker.wire.sizes import parse_duration, parse_size

USAGE_EXIT = 2
#: Exit status of ``wait`` and ``run`` when jwclient itself fails (as ``docker run``).
OWN_ERROR_EXIT = 125


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, as every jwclient error is."""

    def error(self, message: str) -> NoReturn:
        if "required: program" in message:  # argparse's words for `start -x`
            message = ("no PROGRAM given (to run one whose name starts with '-', put -- "
                       "before it: jwclient run -- -prog)")
        sys.stderr.write(f"jwclient: {message} (see {self.prog} --help)\n")
        raise SystemExit(USAGE_EXIT)


def _duration(text: str) -> float:
    """``30``, ``30s``, ``5m``, ``1h``, ``2d``, ``250ms``."""
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < value < 10**8:
        raise argparse.ArgumentTypeError(
            f"duration {text!r} out of range: more than 0 and less than 10^8 seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number {text!r}") from None
    if not 1 <= value <= 2**31:
        raise argparse.ArgumentTypeError(f"{value} is not from 1 to {2**31}")
    return value


def _job_ref(text: str) -> str | int:
    """A job's id, a unique prefix of 8 or more characters of one, or a pid (all
    digits); the daemon resolves it among the jobs the caller may see."""
    return int(text) if text.isdigit() and text.isascii() else text


def _lines(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--tail takes a number of lines, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cores(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"bad CPU limit {text!r}: a number of cores, 0.5")
    return value


def _pids(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"bad process limit {text!r}: a whole number >= 2")
    return int(text)


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 1 << 20
    if not -1000 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"bad priority {text!r}: a whole number from "
                                         "-1000 to 1000")
    return value


def _job_list(text: str) -> list[str | int]:
    refs = [_job_ref(t.strip()) for t in text.split(",") if t.strip()]
    if not refs:
        raise argparse.ArgumentTypeError(f"--after takes JOB[,JOB...], got {text!r}")
    return refs


def _label(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, got {text!r}")
    return text


def _env_entry(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {text!r}")
    return text


def _namespaces(text: str) -> list[str]:
    """``pid,net,mount``: each at most once, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ISOLATE]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--isolate takes a comma-separated list of {', '.join(ISOLATE)}, "
            f"got {text!r}")
    return list(dict.fromkeys(names))


def _add_start_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", "-e", action="append", type=_env_entry, default=[],
                   metavar="K=V", help="set a variable in the job's environment (repeatable)")
    p.add_argument("--dir", "-C", help="working directory of the job (default: the daemon's)")
    p.add_argument("--timeout", type=_duration, help="stop the job after this long (30s, 5m)")
    p.add_argument("--user", help="run as this Unix user, if the daemon's policy allows you")
    p.add_argument("--isolate", type=_namespaces, metavar="NS[,NS...]",
                   help="run in new namespaces: pid (sees only its own processes), net "
                        "(loopback only), mount (a private /tmp); root daemons only")
    p.add_argument("--memory", type=_size, help="memory limit (512M, 1G; K M G T: powers of "
                   "1024); past it the kernel kills the job's processes (oom_killed)")
    p.add_argument("--cpu", type=_cores, help="CPU limit in cores (0.5: half of one CPU)")
    p.add_argument("--pids", type=_pids, help="most processes at once (then forks fail)")
    p.add_argument("--io-read", type=_size, metavar="BYTES/S",
                   help="read limit in bytes per second (10M) on the disks of the job's "
                        "directory and the daemon's state")
    p.add_argument("--io-write", type=_size, metavar="BYTES/S",
                   help="write limit in bytes per second (10M); on cgroup v1 direct writes "
                        "only, not buffered writeback")
    p.add_argument("--queue", help="the daemon's queue to wait in for a slot (default: "
                   "default); see jwclient queue")
    p.add_argument("--priority", type=_priority, default=0,
                   help="higher starts first among queued jobs (up to your max_priority)")
    p.add_argument("--after", type=_job_list, default=[], metavar="JOB[,JOB...]",
                   help="start once these jobs (ids, pids or names) have all exited 0; "
                        "cancelled if one does not")
    p.add_argument("--name", help="a name for the job, unique among your queued and "
                   "running jobs; other commands then take it for JOB")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="K=V",
                   help="a label (repeatable); list --label finds it")
    p.add_argument("program", help="program path, or a name looked up in the job's PATH")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments to the program")


def build_parser() -> argparse.ArgumentParser:
    # Settings default to None here: a flag, then its variable, then the chosen worker's
    # entry in the configuration file, then the default (jobworker.client.profiles).
    parser = _Parser(prog="jwclient", description=__doc__.split("\n")[0] if __doc__ else None,
                     epilog="Settings: a flag, else its variable, else the worker's entry "
                            "in the configuration file, else the default.")
    parser.add_argument("--server", help="HOST:PORT of the daemon [$JWCLIENT_SERVER, "
                                         "127.0.0.1:8443]")
    parser.add_argument("--ca", help="CA file [$JWCLIENT_CA]")
    parser.add_argument("--cert", help="client certificate [$JWCLIENT_CERT]")
    parser.add_argument("--key", help="client key [$JWCLIENT_KEY]")
    parser.add_argument("--pki", help="directory with ca.pem, NAME.pem, NAME.key "
                                      "[$JWCLIENT_PKI]")
    parser.add_argument("--identity", help="NAME within --pki [$JWCLIENT_IDENTITY]")
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file naming workers [$JWCLIENT_CONFIG, "
                             "$XDG_CONFIG_HOME/jobworker/client.toml]")
    parser.add_argument("--worker", "-w", metavar="NAME",
                        help="the worker of the configuration file to talk to "
                             "[$JWCLIENT_WORKER, the file's default]")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--connect-timeout", type=_duration, default=10.0,
                        help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"jwclient {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # --json is taken after the command's name too (never from the program's arguments:
    # those follow PROGRAM, which ends option parsing); SUPPRESS keeps an earlier one.
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]

    sub.add_parser("whoami", help="print the identity and role the server sees")

    p = sub.add_parser("start", help="start a job and print its id",
                       description="Start PROGRAM (never through a shell) and print the new "
                                   "job's id alone on one line.")
    _add_start_options(p)

    p = sub.add_parser("stop", help="stop a job (SIGTERM, then SIGKILL after a grace)")
    p.add_argument("job", type=_job_ref, help="job id or pid")
    p.add_argument("--grace", type=_duration, help="seconds between SIGTERM and SIGKILL")

    p = sub.add_parser("status", help="show one job, by id or pid")
    p.add_argument("job", type=_job_ref)

    p = sub.add_parser("list", help="list jobs, newest first",
                       description="List jobs, newest first: the newest 100 unless --limit "
                                   "or --all says otherwise.")
    p.add_argument("--running", action="store_true", help="only running jobs "
                   "(the same as --state running)")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--owner", help="only this identity's jobs")
    p.add_argument("--since", type=_duration, metavar="DURATION",
                   help="only jobs started within this long (1h, 2d)")
    p.add_argument("--until", type=_duration, metavar="DURATION",
                   help="only jobs started more than this long ago")
    p.add_argument("--name", help="only jobs with this name")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="K=V",
                   help="only jobs with this label (repeatable: all of them)")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--limit", type=_count, default=100, help="at most N jobs (100)")
    many.add_argument("--all", action="store_true", help="every job, page by page")
    p.add_argument("--wide", action="store_true",
                   help="never cut a cell to fit the terminal's width")
    p.add_argument("--all-workers", action="store_true",
                   help="every worker of the configuration file, at once (a WORKER column)")

    p = sub.add_parser("logs", help="write a job's output to stdout, byte-exact")
    p.add_argument("job", type=_job_ref)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stderr", action="store_true", help="the job's stderr instead")
    which.add_argument("--both", action="store_true",
                       help="stdout to stdout and stderr to stderr")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.add_argument("--offset", type=int, default=0, help="start at this byte")
    p.add_argument("--tail", type=_lines, metavar="N",
                   help="only the last N lines (then new ones, with -f)")

    p = sub.add_parser("forget", help="remove an ended job: its record and its logs",
                       description="Remove one ended job of yours (an admin: anyone's), "
                                   "its record and its log folder.")
    p.add_argument("job", type=_job_ref)

    p = sub.add_parser("wait", help="wait for jobs to end; exit with their status",
                       description="Wait for every JOB to end and exit with a status: 125 if "
                                   "any could not start (or jwclient failed), else the first "
                                   "non-zero status in argument order (the exit code, 128+N "
                                   "if killed by signal N), else 0.")
    p.add_argument("job", type=_job_ref, nargs="+")

    p = sub.add_parser("run", help="start a job, stream its output, exit with its status",
                       description="Start PROGRAM, stream its stdout and stderr here, and "
                                   "exit with its status. Ctrl-C stops the job.")
    _add_start_options(p)

    sub.add_parser("queue", help="show each queue: jobs running, queued, and its limit")

    p = sub.add_parser("submit", help="start a batch of jobs from a TOML file")
    p.add_argument("file", help="TOML file with [[job]] tables (see examples/)")
    p.add_argument("--wait", action="store_true", help="show progress until all have ended")

    sub.add_parser("workers", help="show the configured workers: reachable? as whom?",
                   description="Connect to every worker of the configuration file at once "
                               "and show whether it answers and the identity it sees.")

    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh)",
                       description="Print a completion script: "
                                   "eval \"$(jwclient completion bash)\" in ~/.bashrc.")
    p.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _connection_settings(args: argparse.Namespace, single: bool = True
                         ) -> tuple[Any, str | None, dict[str, Any]]:
    """The config of the chosen worker (or of flags and variables alone), the worker's
    name, and every configured worker's config (for ``workers``, ``--all-workers`` and
    looking a job up elsewhere); UsageError for what cannot make one."""
    from jobworker.client import profiles
    from jobworker.client.endpoint import ClientError, parse_server

    env = os.environ
    try:
        loaded = profiles.load(*profiles.config_path(args.config, env))
        name = profiles.chosen(loaded, args.worker, env)
    except profiles.ProfileError as e:
        raise UsageError(str(e)) from None
    flags = {key: getattr(args, key) for key in profiles.SETTINGS}
    config, problem = profiles.client_config(
        profiles.settings(flags, env, loaded.workers.get(name, {}) if name else {}))
    if config is None and single:
        raise UsageError(problem)
    try:
        if config is not None:
            parse_server(config.server)
    except ClientError as e:
        raise UsageError(str(e)) from None
    others: dict[str, Any] = {}
    for other, entry in loaded.workers.items():
        # Each worker at its own address: a server flag or variable names one daemon.
        values = profiles.settings({**flags, "server": None},
                                   {k: v for k, v in env.items() if k != "JWCLIENT_SERVER"},
                                   entry)
        made, problem = profiles.client_config(values)
        others[other] = made if made is not None else problem
    return config, name, others


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command had begun: as quiet as during one
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("start", "run") and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    if args.command == "completion":
        from jobworker.client import completion  # shtab, for this command alone

        sys.stdout.write(completion.script(parser, args.shell))
        return 0
    fleet = args.command == "workers" or getattr(args, "all_workers", False)
    try:
        config, name, workers = _connection_settings(args, single=not fleet)
    except UsageError as e:
        sys.stderr.write(f"jwclient: {e}\n")
        return USAGE_EXIT
    if fleet and not workers:
        sys.stderr.write("jwclient: no workers are configured (see jwclient --help, "
                         "--config)\n")
        return USAGE_EXIT
    from jobworker.client import commands

    return commands.run(args, config, workers, name)


if __name__ == "__main__":
    sys.exit(main())
