"""One process owns a run folder at a time: an OS lock on RUN/.nfnet-zoo.lock.

Two `finetune` commands on one --output used to both train and both exit 0, the folder ending with one run's
args.json beside the other's weights. flock is released by the kernel when its holder exits, however it exits
(SIGKILL, a crash, a lost node), so no stale lock is ever left to clear by hand; the file only names the holder
for the refusal. Under torchrun only the main process holds it: the other processes are the same run.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import warnings
from pathlib import Path
from typing import Optional

from ..errors import NFNetZooError

LOCK = ".nfnet-zoo.lock"


class RunLock:
    """`acquire()` takes the lock on RUN or says who holds it; `release()` (or the process's exit) frees it."""

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """None once held, else one line naming the folder and the process that holds it."""
        try:  # O_NOFOLLOW: a planted link must not make us create or truncate a file elsewhere
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise NFNetZooError(f"{self.path} is a link; remove it (it is only a lock file)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # some network filesystems
                os.close(fd)
                warnings.warn(f"the filesystem of {self.path.parent} has no locks: a second finetune on it would not "
                              f"be stopped ({e.strerror})")
                return None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            return (f"{self.path.parent} is in use by another nfnet-zoo finetune ({holder}); wait for it to end "
                    f"(or stop it: it saves and can be resumed), or pass another --output")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor frees the flock
            self._fd = None


__all__ = ["RunLock", "LOCK"]
