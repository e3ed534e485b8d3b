"""Which block device holds a path, as the kernel's IO throttles name it: ``MAJ:MIN`` of the
whole disk (blkio.throttle.*_bps_device and io.max refuse a partition with ENODEV), or None
for a file system on no block device (tmpfs, overlayfs, btrfs's anonymous devices, NFS)."""

from __future__ import annotations

import os
from collections.abc import Iterable


class BlockDevices:
    """Resolves paths to whole disks through ``/sys/dev/block``; each file system's answer
    is kept (a few stats and sysfs reads the first time, a dict look-up after)."""

    def __init__(self, sysfs: str = "/sys") -> None:
        self._sysfs = sysfs
        self._disks: dict[int, str | None] = {}  # st_dev -> whole disk, or None

    def disk_of(self, path: str) -> str | None:
        """``MAJ:MIN`` of the disk holding ``path``; None if none (or ``path`` is gone)."""
        try:
            dev = os.stat(path).st_dev
        except OSError:
            return None
        if dev not in self._disks:
            self._disks[dev] = self.whole_disk(os.major(dev), os.minor(dev))
        return self._disks[dev]

    def disks_of(self, paths: Iterable[str]) -> list[str]:
        """The distinct disks holding ``paths``, in order."""
        found = (self.disk_of(p) for p in paths)
        return list(dict.fromkeys(d for d in found if d is not None))

    def whole_disk(self, major: int, minor: int) -> str | None:
        # Anonymous devices (major 0) back no block device.  A partition's sysfs directory
        # has a ``partition`` file and sits in its disk's directory, whose ``dev`` names it.
        if major == 0:
            return None
        entry = os.path.join(self._sysfs, "dev", "block", f"{major}:{minor}")
        try:
            real = os.path.realpath(entry, strict=True)
        except OSError:
            return None
        if not os.path.exists(os.path.join(real, "partition")):
            return f"{major}:{minor}"
        try:
            with open(os.path.join(os.path.dirname(real), "dev"), encoding="ascii") as f:
                return f.read().strip() or None
        except OSError:
            return None


__all__ = ["BlockDevices"]
