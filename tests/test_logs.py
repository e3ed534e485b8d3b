"""logs: the log root asks ext2/3/4 to spread job directories over block groups."""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

import pytest

from jobworker import logs
from jobworker.logs import LogStore, spread_subdirectories


def topdir_flag(path: Path) -> bool:
    """FS_TOPDIR_FL as the kernel reports it (``lsattr -d`` shows it as T)."""
    assert logs._FLAGS_IOCTLS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, logs._FLAGS_IOCTLS[0], flags)
        return bool(flags[0] & logs._FS_TOPDIR_FL)
    finally:
        os.close(fd)


@pytest.fixture
def ext_dir(tmp_path: Path) -> Path:
    """A directory on a file system with FS_TOPDIR_FL (ext2/3/4), else the test skips."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not spread_subdirectories(str(probe)):
        pytest.skip(f"{tmp_path} is not on ext2/3/4 (or this machine has no FS_IOC_SETFLAGS)")
    assert topdir_flag(probe)
    return tmp_path


def test_a_new_log_root_and_spare_root_are_marked(ext_dir: Path) -> None:
    store = LogStore(str(ext_dir / "state" / "logs"))
    store.prepare()
    assert topdir_flag(ext_dir / "state" / "logs")
    spare, out, err = store.make_spare("g0", "0")
    os.close(out)
    os.close(err)
    assert topdir_flag(ext_dir / "state" / "logs" / ".spare")
    # Only the roots: a job's own directory is an ordinary one.
    assert not topdir_flag(Path(spare).parent)
    logs_, out, err = store.create_open("0c8f0a4e-3b1e-4a57-9d43-7d2b7b1b9a11", 1.5)
    os.close(out)
    os.close(err)
    assert not topdir_flag(Path(logs_.dir))


def test_an_existing_root_is_marked_at_start(ext_dir: Path) -> None:
    root = ext_dir / "logs"
    root.mkdir()
    assert not topdir_flag(root)
    LogStore(str(root)).prepare()
    assert topdir_flag(root)


def test_a_root_made_lazily_by_the_first_job_is_marked(ext_dir: Path) -> None:
    store = LogStore(str(ext_dir / "lazy" / "logs"))
    _, out, err = store.create_open("0c8f0a4e-3b1e-4a57-9d43-7d2b7b1b9a11", 1.5)
    os.close(out)
    os.close(err)
    assert topdir_flag(ext_dir / "lazy" / "logs")


def test_prepare_tolerates_a_root_it_cannot_make(tmp_path: Path) -> None:
    """A state dir that cannot hold logs is reported per job, not by failing the start."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    LogStore(str(blocker / "logs")).prepare()  # no exception
    assert not spread_subdirectories(str(blocker))  # not a directory: False, no exception


def test_a_file_system_without_the_flag_is_left_alone(tmp_path: Path) -> None:
    """tmpfs (no FS_TOPDIR_FL) answers False and the directory works as before."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    d = shm / f"jw-test-{os.getpid()}"
    d.mkdir()
    try:
        assert spread_subdirectories(str(d)) is False
    finally:
        d.rmdir()
