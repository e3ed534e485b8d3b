"""logs: the log root asks ext2/3/4 to spread job directories while making them is slow."""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

import pytest

from jobworker.jobs import placement
from jobworker.jobs.logs import LogStore
from jobworker.jobs.placement import SpreadWhenSlow, spread_subdirectories
from jobworker.testing import create_open_logs


def topdir_flag(path: Path) -> bool:
    """FS_TOPDIR_FL as the kernel reports it (``lsattr -d`` shows it as T)."""
    assert placement._FLAGS_IOCTLS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, placement._FLAGS_IOCTLS[0], flags)
        return bool(flags[0] & placement._FS_TOPDIR_FL)
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


class SteppingClock:
    """perf_counter for LogStore: each reading is ``step`` seconds after the last, so one
    directory made costs ``step`` (two readings around it)."""

    def __init__(self, step: float) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


JOB = "0c8f0a4e-3b1e-4a57-9d43-7d2b7b1b9a11"


def make_job_dirs(store: LogStore, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        _, out, err = create_open_logs(store, f"{JOB[:-4]}{i:04d}", 1.5)
        os.close(out)
        os.close(err)


def test_the_log_root_starts_plain_and_the_spare_root_is_marked(ext_dir: Path) -> None:
    root = ext_dir / "state" / "logs"
    root.mkdir(parents=True)
    assert spread_subdirectories(str(root))  # as a previous run may have left it
    store = LogStore(str(root))
    store.prepare()
    assert not topdir_flag(root) and not store.spreading
    spare, out, err = store.make_spare("g0", "0")
    os.close(out)
    os.close(err)
    assert topdir_flag(root / ".spare")
    assert not topdir_flag(Path(spare).parent)  # only the roots are ever marked


def test_slow_job_directories_mark_the_root_for_a_while(ext_dir: Path) -> None:
    """Directories taking 1 ms each (a disk right after mass deletions) get the root marked
    within a few; SPREAD_HOLD later the mark comes off for a fresh look."""
    clock = SteppingClock(0.0005)  # each directory measures 0.5 ms
    store = LogStore(str(ext_dir / "logs"), clock=clock)
    store.prepare()
    make_job_dirs(store, 4)
    assert store.spreading and topdir_flag(ext_dir / "logs")
    clock.now += SpreadWhenSlow.SPREAD_HOLD
    make_job_dirs(store, 1, first=4)
    assert not store.spreading and not topdir_flag(ext_dir / "logs")


def test_fast_job_directories_leave_the_root_plain(ext_dir: Path) -> None:
    clock = SteppingClock(0.000_02)  # each directory measures 20 us
    store = LogStore(str(ext_dir / "logs"), clock=clock)
    store.prepare()
    make_job_dirs(store, 50)
    assert not store.spreading and not topdir_flag(ext_dir / "logs")


def test_a_slow_root_made_lazily_by_the_first_jobs_is_marked(ext_dir: Path) -> None:
    store = LogStore(str(ext_dir / "lazy" / "logs"), clock=SteppingClock(0.001))
    make_job_dirs(store, 3)
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


def test_a_file_system_without_the_flag_is_asked_once(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow directories on a file system with no FS_TOPDIR_FL: one attempt, not one per job."""
    calls: list[tuple[str, bool]] = []

    def unsupported(path: str, on: bool = True) -> bool:
        calls.append((path, on))
        return False

    monkeypatch.setattr(placement, "spread_subdirectories", unsupported)
    store = LogStore(str(tmp_path / "logs"), clock=SteppingClock(0.001))
    make_job_dirs(store, 10)
    assert calls == [(store.root, True)] and not store.spreading
