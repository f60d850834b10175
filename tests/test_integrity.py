"""Data integrity on a mounted S3 volume: large files across remounts (read
back from S3 with an empty cache), random overwrites/truncates/appends
against an in-memory model across block (4 MiB) and chunk (64 MiB)
boundaries, sparse files, two mounts of one volume, and fsync + SIGKILL.

Under JFSCACHE_TEST_DIR the `mnt` tests run against that plain directory
(the remount steps are skipped); tests needing mounts of their own skip."""
from __future__ import annotations

import hashlib
import os
import random
import signal
from pathlib import Path

import pytest

from helpers import MiB, file_sha256, first_diff, wait_for

BLOCK = 4 * MiB
CHUNK = 64 * MiB


def needs_mount(mount):
    if mount is None:
        pytest.skip("needs a jfscache mount (JFSCACHE_TEST_DIR is set)")


def write_random_file(path: Path, size: int, seed: int, piece: int = MiB) -> str:
    """Write `size` pseudo-random bytes in `piece`-sized writes; sha256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            chunk = rng.randbytes(min(piece, left))
            h.update(chunk)
            assert f.write(chunk) == len(chunk)
            left -= len(chunk)
    return h.hexdigest()


def compare_file(path: Path | int, model: bytearray, what: str = "") -> None:
    """The whole file equals the model (read in 1 MiB pieces)."""
    close = False
    if isinstance(path, (str, Path)):
        fd = os.open(path, os.O_RDONLY)
        close = True
    else:
        fd = path
    try:
        size = os.fstat(fd).st_size
        assert size == len(model), f"{what}: size {size}, model {len(model)}"
        mv = memoryview(model)
        off = 0
        while off < len(model):
            n = min(MiB, len(model) - off)
            got = os.pread(fd, n, off)
            if got != mv[off:off + n]:
                i = first_diff(got, mv[off:off + n])
                raise AssertionError(
                    f"{what}: file differs from the model at offset {off + i} "
                    f"(got {len(got)} bytes of {n}; file {got[i:i + 8]!r}, "
                    f"model {bytes(mv[off + i:off + i + 8])!r})")
            off += n
        assert os.pread(fd, 4096, len(model)) == b"", f"{what}: data past EOF"
    finally:
        if close:
            os.close(fd)


# ---------------------------------------------------------------------------
# a large file across remount

def test_large_file_hash_across_remount(mnt, mnt_mount):
    needs_mount(mnt_mount)
    size = 200 * MiB
    path = mnt / "large.bin"
    want = write_random_file(path, size, seed=200)
    assert path.stat().st_size == size
    assert file_sha256(path) == (want, size), "read-back differs before remount"
    mnt_mount.remount(clear_cache=True)      # the read now comes from S3
    assert path.stat().st_size == size
    assert file_sha256(path) == (want, size), "read-back differs after remount (from S3)"


# ---------------------------------------------------------------------------
# random overwrites, truncates and appends against a model

# offsets straddling block and chunk boundaries
BOUNDARIES = [BLOCK * i for i in range(1, 6)] + [CHUNK - BLOCK, CHUNK, CHUNK + BLOCK]
MAX_END = CHUNK + 2 * BLOCK + MiB        # the file stays below ~73 MiB


def _pick_len(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.25:
        return rng.randint(1, 64)
    if r < 0.5:
        return rng.randint(65, 64 * 1024)
    if r < 0.8:
        return rng.randint(64 * 1024, MiB)
    return rng.randint(MiB, 5 * MiB)      # spans whole blocks


def _pick_offset(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.5:
        return max(0, rng.choice(BOUNDARIES) + rng.randint(-70_000, 70_000))
    if r < 0.85:
        return rng.randint(0, max(0, min(size, 24 * MiB)))
    return rng.randint(0, MAX_END - MiB)


def test_truncate_shrink_then_grow_reads_zeros(mnt, mnt_mount):
    """Data cut off by a shrink must not come back when the file grows again
    (newer-slice-wins must include truncation)."""
    path = mnt / "shrink.bin"
    data = random.Random(7).randbytes(9 * MiB)
    path.write_bytes(data)
    os.truncate(path, MiB + 5)
    os.truncate(path, 10 * MiB)
    with open(path, "r+b") as f:                  # a write beyond EOF after a shrink
        f.truncate(3 * MiB)
        f.seek(6 * MiB)
        f.write(b"X" * 10)
    model = bytearray(data[:MiB + 5]) + bytearray(6 * MiB - (MiB + 5)) + b"X" * 10
    compare_file(path, model, "shrink/grow")
    if mnt_mount is not None:
        mnt_mount.remount(clear_cache=True)
        compare_file(path, model, "shrink/grow after remount")


# ---------------------------------------------------------------------------
# sparse files

def test_sparse_file_holes_read_zeros(mnt):
    path = mnt / "sparse.bin"
    pieces = [(0, b"A" * 10), (5 * MiB + 3, b"B" * 4096), (BLOCK - 2, b"C" * 4),
              (CHUNK + 1, b"D" * 100), (2 * CHUNK + BLOCK - 1, b"E")]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    size = 2 * CHUNK + BLOCK
    assert path.stat().st_size == size
    model = bytearray(size)
    for off, data in pieces:
        model[off:off + len(data)] = data
    compare_file(path, model, "sparse")
    # reads that start inside holes and end in data, and the reverse
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in [(5 * MiB - 10, 20), (5 * MiB + 4090, 100), (CHUNK - 3, 8),
                       (2 * CHUNK + BLOCK - 5, 100)]:
            assert os.pread(fd, n, off) == bytes(model[off:off + n]), f"pread({off}, {n})"
    finally:
        os.close(fd)


def test_file_extended_by_truncate_is_zeros(mnt):
    path = mnt / "grown.bin"
    path.write_bytes(b"head")
    os.truncate(path, CHUNK + 3 * MiB)
    h = hashlib.sha256(b"head" + bytes(CHUNK + 3 * MiB - 4)).hexdigest()
    assert file_sha256(path) == (h, CHUNK + 3 * MiB)


# ---------------------------------------------------------------------------
# two mounts of one volume

def _read(p: Path):
    return p.read_bytes()


def test_two_mounts_see_each_other(make_volume, mount_volume):
    vol = make_volume("s3")
    a = mount_volume(vol, None, "--attr-timeout", "1")
    b = mount_volume(vol, None, "--attr-timeout", "1")
    A, B = a.path, b.path
    T = 10   # generous deadline; the attribute timeout is 1 s

    # a new file written on A appears on B
    (A / "f1").write_bytes(b"hello from A")
    wait_for(lambda: (B / "f1").read_bytes() == b"hello from A", T, what="B to see f1")

    # same-size overwrite on B: A must not serve its stale page cache
    with open(B / "f1", "r+b") as f:
        f.write(b"HELLO FROM B")
    wait_for(lambda: (A / "f1").read_bytes() == b"HELLO FROM B", T,
             what="A to see B's overwrite")

    # append on A
    with open(A / "f1", "ab") as f:
        f.write(b" + more")
    wait_for(lambda: (B / "f1").read_bytes() == b"HELLO FROM B + more", T,
             what="B to see A's append")

    # a directory and a multi-block file
    (A / "d1").mkdir()
    big = random.Random(3).randbytes(9 * MiB + 1)
    (A / "d1" / "f2").write_bytes(big)
    wait_for(lambda: "f2" in os.listdir(B / "d1"), T, what="B to list d1/f2")
    wait_for(lambda: (B / "d1" / "f2").read_bytes() == big, T, what="B to read d1/f2")

    # rename on B
    os.rename(B / "d1" / "f2", B / "d1" / "f3")
    wait_for(lambda: not (A / "d1" / "f2").exists() and (A / "d1" / "f3").exists(), T,
             what="A to see the rename")
    assert (A / "d1" / "f3").read_bytes() == big
    assert sorted(os.listdir(A / "d1")) == ["f3"]

    # rename across directories on A, then deletes
    os.rename(A / "f1", A / "d1" / "f1")
    wait_for(lambda: sorted(os.listdir(B / "d1")) == ["f1", "f3"], T,
             what="B to see f1 moved into d1")
    wait_for(lambda: not (B / "f1").exists(), T, what="B to lose the old name f1")
    os.unlink(A / "d1" / "f1")
    os.unlink(A / "d1" / "f3")
    os.rmdir(A / "d1")
    wait_for(lambda: not (B / "d1").exists(), T, what="B to see d1 deleted")
    assert os.listdir(B) == [] or all(n.startswith(".") for n in os.listdir(B))

    # a file created on B while A holds a negative dentry for it
    assert not (A / "late").exists()
    (B / "late").write_bytes(b"late")
    wait_for(lambda: (A / "late").read_bytes() == b"late", T, what="A to see 'late'")
    a.umount()
    b.umount()


# ---------------------------------------------------------------------------
# crash after fsync

def test_fsync_then_sigkill_then_remount(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    data1 = random.Random(11).randbytes(9 * MiB + 77)
    data2 = random.Random(12).randbytes(MiB + 3)
    (m.path / "sub").mkdir()
    with open(m.path / "sub" / "closed.bin", "wb") as f:
        f.write(data1)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(m.path / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.write(fd, data2) == len(data2)
    os.fsync(fd)                                   # still open when the daemon dies
    # overwrite part of the first file in place, fsync'd as well
    with open(m.path / "sub" / "closed.bin", "r+b") as f:
        f.seek(BLOCK - 10)
        f.write(b"Z" * 20)
        os.fsync(f.fileno())
    data1 = data1[:BLOCK - 10] + b"Z" * 20 + data1[BLOCK + 10:]

    m.kill(signal.SIGKILL)
    try:
        os.close(fd)
    except OSError:
        pass                                       # ENOTCONN: the daemon is gone
    m.remount(clear_cache=True)
    assert (m.path / "sub" / "closed.bin").read_bytes() == data1
    assert (m.path / "open.bin").read_bytes() == data2
    m.umount()
