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


def test_add_declines_when_the_queue_is_full_but_add_wait_does_not(tmp_path, monkeypatch):
    """Reads cache best-effort (a full write queue drops the block); warmup
    must not: add_wait waits for room and for the write itself. A block from
    the store (add_owned) waits a bounded time for room, then is dropped."""
    import time

    import trio

    import jfscache.cache.disk as disk_mod
    monkeypatch.setattr(disk_mod, "_QUEUE_LIMIT", 3 * PIECE)
    monkeypatch.setattr(disk_mod, "_ROOM_WAIT", 0.3)
    blocks = {f"k{i}": os.urandom(PIECE) for i in range(22)}
    owned, stalled = list(blocks)[12:18], list(blocks)[18:]

    async def main():
        d = disk_mod.DiskCache([str(tmp_path / "cache")], 1 << 30, 0.0)
        await d.open()
        async with trio.open_nursery() as n:
            d.start(n)
            for k, v in list(blocks.items())[:6]:
                d.add(k, v)   # best effort: only 3 fit in the queue
            await d.drain()
            assert sum(d.has(k) for k in list(blocks)[:6]) == 3
            async with trio.open_nursery() as w:
                for k, v in list(blocks.items())[6:12]:
                    w.start_soon(d.add_wait, k, v)
            assert all(d.has(k) for k in list(blocks)[6:12])
            for k, v in list(blocks.items())[6:12]:
                assert await d.get(k) == v
            for k in owned:   # one after another, as a reader's misses come: add() would drop three
                await d.add_owned(k, blocks[k])
            await d.drain()
            assert all(d.has(k) for k in owned)
            write = disk_mod._write_file
            monkeypatch.setattr(disk_mod, "_write_file", lambda p, b: (time.sleep(1), write(p, b))[1])
            for k in stalled:   # three fill the queue (one being written); the fourth waits, then is dropped
                await d.add_owned(k, blocks[k])
            await d.drain()
            assert [d.has(k) for k in stalled] == [True] * 3 + [False]
            n.cancel_scope.cancel()
        d.close()

    trio.run(main)
