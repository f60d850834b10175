"""Small local-filesystem helpers shared by the local store and the disk cache."""
from __future__ import annotations

import os


def write_atomic(path: str, tmp: str, data, *, fsync: bool) -> None:
    """Write `data` to `path` through the temporary file `tmp` (same
    directory) and a rename: readers see the old file or all of the new one.
    The temporary file is created exclusively (0600) and removed on failure;
    a missing directory raises FileNotFoundError before anything is written."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
