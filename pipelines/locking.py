"""One exclusive advisory lock (flock) on a file, created if needed; shared by the log, state and scans."""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def locked_file(path, append: bool = True, remove: bool = False):
    """Yield an fd of ``path`` (created 0640, parent folders too) while holding an exclusive flock.

    ``remove``: a pure lock file, deleted by its holder before it lets go, so none is left behind.
    A waiter that then gets the lock on the deleted file sees that the path no longer names it and
    tries again on the new one.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_APPEND if append else 0), 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if remove:
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                held = os.fstat(fd)
                if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
                    os.close(fd)  # the holder before us deleted it: lock the file that is there now
                    continue
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        yield fd
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
