"""Small local-filesystem helpers shared by the local store and the disk cache."""
from __future__ import annotations

import os
import re


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


class Busy(Exception):
    """Another jfscache process holds a lock this one needs (one line, for the CLI)."""


def hold_lock(path: str, what: str, owner: str) -> int:
    """Take an exclusive lock on `path` for the life of this process and
    return its fd (closing it releases the lock; so does process death, so a
    killed daemon never leaves a stale lock). `owner` is written into the
    file so that the next process can say who holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Busy(f"{what} is in use by {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, major:minor, fs type) of every mount, from
    /proc/self/mountinfo. No mount is touched: a stat would hang on a hung
    FUSE daemon, and fail on a dead one."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
            out.append((point, parts[2], parts[parts.index("-") + 1]))
    return out


def mount_type(path: str) -> str | None:
    """The type of the file system mounted exactly at `path` (absolute);
    None if nothing is. Where mounts are stacked, the one on top (listed last)."""
    types = [fstype for point, _, fstype in mountinfo() if point == path]
    return types[-1] if types else None
