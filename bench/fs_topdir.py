"""What a job's log directory costs to make, in a plain directory and in one marked as
jobworker marks its log root (FS_TOPDIR_FL, ``chattr +T``).

Run: .venv/bin/python bench/fs_topdir.py [--dir /var/lib/jobworker] [--count 500] [--dirty N]

How: in two sibling directories under DIR (default: a new one in /tmp, the file system the
other benchmarks use), one plain and one marked by ``jobworker.jobs.placement.spread_subdirectories``,
make COUNT job-like directories each holding two new files (exactly what a start makes),
alternating plain and marked, three rounds; the figure is the mean time per directory.

The result depends on the file system's recent history: ext4 without a journal skips every
inode freed in the last minutes when it allocates one, searching the parent directory's
block group first.  ``--dirty N`` first makes and deletes N files next to the test
directories (the state a busy host, or the test suite, leaves); without it the figures are
those of the disk as it is now.  Not part of run_all: it measures the host, not jobworker.
Everything it makes is deleted at the end (which dirties the disk for the next minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobworker.jobs.logs import spread_subdirectories  # noqa: E402 (after the path fallback)


def make_dirs(root: str, count: int) -> float:
    """Mean seconds per ``mkdir`` + two ``open(O_CREAT)``, as LogStore makes them."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    began = time.perf_counter()
    for _ in range(count):
        d = os.path.join(root, str(uuid.uuid4()))
        os.mkdir(d, 0o750)
        os.close(os.open(os.path.join(d, "stdout.log"), flags, 0o640))
        os.close(os.open(os.path.join(d, "stderr.log"), flags, 0o640))
    return (time.perf_counter() - began) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to measure (default: a temp dir in /tmp)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--dirty", type=int, default=0, metavar="N")
    opts = parser.parse_args()
    top = tempfile.mkdtemp(prefix="jw-fs-topdir-", dir=opts.dir or "/tmp")
    try:
        if opts.dirty:
            junk = os.path.join(top, "junk")
            os.mkdir(junk)
            for n in range(opts.dirty):
                os.close(os.open(os.path.join(junk, str(n)), os.O_WRONLY | os.O_CREAT, 0o600))
            shutil.rmtree(junk)
            print(f"made and deleted {opts.dirty} files first")
        plain, marked = os.path.join(top, "plain"), os.path.join(top, "marked")
        os.mkdir(plain)
        os.mkdir(marked)
        if not spread_subdirectories(marked):
            print(f"{top}: no FS_TOPDIR_FL here (not ext2/3/4): nothing to compare")
            return
        print(f"in {top}, {opts.count} directories per figure, us per directory + 2 files:")
        for r in range(3):
            a, b = make_dirs(plain, opts.count), make_dirs(marked, opts.count)
            print(f"  round {r + 1}: plain {a * 1e6:7.0f}   marked +T {b * 1e6:7.0f}")
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
