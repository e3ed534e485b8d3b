"""Where ext2/3/4 places new job directories: mark the log root to spread them over block
groups (``chattr +T``) while making them in place is slow, and take the mark off again."""

from __future__ import annotations

import array
import fcntl
import os
import platform
import time
from collections.abc import Callable

#: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (``_IOR/_IOW('f', 1/2, long)``) where the ioctl number
#: layout is Linux's generic one and long is 8 bytes; elsewhere nothing is tried.
_FLAGS_IOCTLS = (0x80086601, 0x40086602) if platform.machine() in ("x86_64", "aarch64") \
    else None
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: str, on: bool = True) -> bool:
    """Mark ``path`` a top of directory hierarchies (``chattr +T``, FS_TOPDIR_FL), or take
    the mark off (``on=False``): ext2/3/4 place each new subdirectory of a marked directory
    in a block group of its own choosing (Orlov) instead of its parent's.  Best effort:
    False where the file system has no such flag.

    Why: for minutes after many files were deleted, ext4 without a journal skips every
    recently freed inode of a group when allocating one, searching the parent's group
    first, and a log root's group is exactly where deleted job directories were.  A job
    directory and its two files on this machine's disk (``bench/fs_topdir.py``): plain
    30-40 us on a quiet disk but 230-930 us right after deletions; marked a steady 70-95
    us.  So ``LogStore`` marks its root only while plain placement is slow.
    """
    if _FLAGS_IOCTLS is None:
        return False
    get, set_ = _FLAGS_IOCTLS
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, get, flags)
        wanted = flags[0] | _FS_TOPDIR_FL if on else flags[0] & ~_FS_TOPDIR_FL
        if wanted != flags[0]:
            flags[0] = wanted
            fcntl.ioctl(fd, set_, flags)
        return True
    except OSError:  # not ext2/3/4 (ENOTTY, EOPNOTSUPP), or not allowed (EPERM)
        return False
    finally:
        os.close(fd)


class SpreadWhenSlow:
    """Marks ``root`` to spread its subdirectories (``spread_subdirectories``) while making
    them is slow, measured by the caller around each one (``made``).

    Plain placement costs about half of spreading on a quiet disk, so a mark is held for
    ``SPREAD_HOLD`` seconds and then taken off, to see whether plain is cheap again.
    """

    #: Directories made slower than this (a moving average of wall time) mark the root ...
    SLOW_MKDIR = 200e-6
    #: ... for this long.
    SPREAD_HOLD = 60.0

    def __init__(self, root: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.root = root
        self.clock = clock
        self._cost = 0.0
        self._since: float | None = None
        self._can_spread = True

    @property
    def spreading(self) -> bool:
        """Whether the root is marked to spread directories now."""
        return self._since is not None

    def start_plain(self) -> None:
        """Take any mark off (at service start: plain placement until it proves slow)."""
        spread_subdirectories(self.root, on=False)
        self._since = None

    def made(self, began: float, now: float) -> None:
        """One directory was made between ``began`` and ``now`` (readings of ``clock``)."""
        self._cost += (now - began - self._cost) / 4
        if self._since is None:
            if self._cost > self.SLOW_MKDIR and self._can_spread:
                if spread_subdirectories(self.root):
                    self._since = now
                else:  # not ext2/3/4: no use asking again for every job
                    self._can_spread = False
        elif now - self._since > self.SPREAD_HOLD:
            spread_subdirectories(self.root, on=False)
            self._since = None
            self._cost = 0.0
