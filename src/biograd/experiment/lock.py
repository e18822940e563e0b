"""One writer per run directory: an advisory OS lock on ``<run_dir>/.lock``.

The lock is ``fcntl.flock`` on a file the writer keeps open: the kernel releases it when the
process ends in any way (``kill -9`` included), so a stale lock cannot block the next run. The
file holds the pid of the process that last took the lock, which is what a refused second writer
names. Where ``fcntl`` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from ..errors import BiogradError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLockedError(BiogradError):
    """Another process is writing the run directory."""


class RunLock:
    """Hold the write lock of ``run_dir`` (created if missing) from :meth:`acquire` to
    :meth:`release`; a context manager. ``RunLockedError`` names the pid holding it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None or fcntl is None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.run_dir} is being written by another biograd process (pid {holder}); "
                "wait for it to finish, or stop it, before running into this directory"
            ) from None
        self._fd = fd
        return self

    def mark(self) -> None:
        """Write this process's pid into the lock file (once the run is known to go ahead)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
