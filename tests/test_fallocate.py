"""fallocate(2) through the mount, compared with the same calls on a local
directory: default mode extends the size, KEEP_SIZE changes nothing visible,
PUNCH_HOLE and ZERO_RANGE read back as zeros, and the size moves only where
it should. Modes the kernel does not send to FUSE (collapse, insert) fail
with EOPNOTSUPP."""
from __future__ import annotations

import ctypes
import errno
import os

import pytest

from helpers import MiB

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


CASES = {
    "default-grow": [(0, 3 * MiB, 2 * MiB)],
    "default-inside": [(0, 100, 1000)],
    "keep-size-past-end": [(KEEP_SIZE, 2 * MiB, 4 * MiB)],
    "punch-hole": [(PUNCH_HOLE | KEEP_SIZE, 4096, 70000)],
    "punch-across-blocks-and-end": [(PUNCH_HOLE | KEEP_SIZE, 4 * MiB - 10, MiB)],
    "zero-range": [(ZERO_RANGE, 1000, 5000)],
    "zero-range-grows": [(ZERO_RANGE, 3 * MiB - 100, MiB)],
    "zero-range-keep-size": [(ZERO_RANGE | KEEP_SIZE, 3 * MiB - 100, MiB)],
    "several": [(PUNCH_HOLE | KEEP_SIZE, 0, 4096), (0, 0, 5 * MiB), (ZERO_RANGE, 4 * MiB, 8192)],
}


def _run(path, steps, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for mode, off, length in steps:
            fallocate(fd, mode, off, length)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return os.stat(path).st_size, f.read()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fallocate_matches_a_local_file_system(case, mnt, tmp_dir):
    data = os.urandom(3 * MiB + 12345)
    local = _run(tmp_dir / "local", CASES[case], data)
    mounted = _run(mnt / "f", CASES[case], data)
    assert mounted[0] == local[0], "sizes differ"
    assert mounted[1] == local[1], "contents differ"


def test_fallocate_punched_hole_survives_remount(mnt, mnt_mount):
    data = os.urandom(6 * MiB)
    f = mnt / "f"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, MiB, 3 * MiB)
    finally:
        os.close(fd)
    want = data[:MiB] + bytes(3 * MiB) + data[4 * MiB:]
    if mnt_mount is not None:
        mnt_mount.remount(clear_cache=True)
    assert f.read_bytes() == want


@pytest.mark.parametrize("mode", [COLLAPSE_RANGE, INSERT_RANGE, PUNCH_HOLE])
def test_unsupported_modes(mode, mnt):
    f = mnt / "f"
    f.write_bytes(bytes(8 * MiB))
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, mode, 0, MiB)   # PUNCH_HOLE without KEEP_SIZE is invalid everywhere
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)
    assert os.stat(f).st_size == 8 * MiB
