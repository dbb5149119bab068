"""One training process per run directory.

Two `fastdpo train` commands on the same --run-dir (a resume started while the run still trains,
say) would interleave their metrics and overwrite each other's checkpoints. The main process holds
an exclusive advisory lock (flock) on the run directory itself from its checks to the end of the
run, so the second command is refused in one line before it reads or writes anything. The lock is
on the directory's own descriptor, so nothing is added to the directory, and the kernel releases it
when the process ends however it ends (a crash or kill -9 leaves no stale lock behind).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded
    fcntl = None


class RunDirInUse(ConfigError):
    """Another process is training in this run directory."""


class RunDirLock:
    """An exclusive lock on a run directory, taken once the directory exists."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        """Lock the (existing) directory, or raise RunDirInUse. A file system without flock
        (some network mounts) leaves the run unguarded rather than refusing it."""
        if self.held or fcntl is None:
            return
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirInUse(f"{self.run_dir} is in use by another fastdpo process: wait for it to end "
                                  "(or stop it), or choose another --run-dir") from None
            return  # ENOLCK, EBADF, ...: locks are not supported here
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit `os` may be gone; the kernel drops the lock anyway
            pass
