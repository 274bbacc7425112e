"""One exclusive advisory lock (flock) on a file, created if needed; shared by the log, state and scans."""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def locked_file(path, append: bool = True):
    """Yield an fd of ``path`` (created 0640, parent folders too) while holding an exclusive flock."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_APPEND if append else 0), 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
