"""Unit tests of the disk tier's piecewise verification (the tricky part of
partial reads): any range reads back exactly, a corrupt piece is caught by
every read that touches it, and only by those."""
import os
import random

from jfscache.cache.disk import _HEAD, PIECE, _read_verified, _write_file


def test_ranges_and_corruption(tmp_path):
    rng = random.Random(1)
    size = 4 * PIECE + 1234
    data = rng.randbytes(size)
    path = str(tmp_path / "b")
    index = _HEAD.pack(size, 0.0) + _write_file(path, data)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    for _ in range(200):
        off = rng.randrange(size)
        end = rng.randint(off + 1, size)
        assert _read_verified(path, size, index, off, end) == data[off:end]
    assert _read_verified(path, size, index, 0, size) == data

    with open(path, "r+b") as f:  # flip one byte in piece 3
        f.seek(3 * PIECE + 7)
        f.write(bytes([data[3 * PIECE + 7] ^ 1]))
    assert _read_verified(path, size, index, 0, 3 * PIECE) == data[:3 * PIECE]
    assert _read_verified(path, size, index, 3 * PIECE + 100, 3 * PIECE + 200) is None
    assert _read_verified(path, size, index, 2 * PIECE, 4 * PIECE + 5) is None
    assert _read_verified(path, size, index, 0, size) is None


def test_truncated_file_is_rejected(tmp_path):
    data = os.urandom(PIECE + 10)
    path = str(tmp_path / "b")
    index = _HEAD.pack(len(data), 0.0) + _write_file(path, data)
    os.truncate(path, PIECE)
    assert _read_verified(path, len(data), index, 0, 10) is None
