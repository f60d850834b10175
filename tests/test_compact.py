"""Compaction: a file taking many small random writes keeps a bounded slice
list (compacted in the background, writers slowed before a hard limit), reads
back exactly, and a reader holding an old slice list never reads a deleted
object, even with no grace period at all."""
from __future__ import annotations

import os
import random


from conftest import needs_mount
from helpers import MiB, wait_for

KiB = 1024


def _slices(redis_server, vol, ino: int, indx: int = 0) -> int:
    r = redis_server.client(int(vol.meta_url.rsplit("/", 1)[1]))
    return r.llen(f"c{ino}_{indx}")


def _stats(m) -> dict:
    import json
    return json.loads((m.path / ".stats").read_text())


def test_random_writes_keep_the_slice_list_bounded(make_volume, mount_volume, redis_server):
    needs_mount()
    vol = make_volume("file")
    m = mount_volume(vol)
    size = 12 * MiB
    model = bytearray(os.urandom(size))
    f = m.path / "db"
    f.write_bytes(model)
    rng = random.Random(7)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(3000):
            off = rng.randrange(0, size - 4 * KiB)
            data = rng.randbytes(rng.choice((512, 4 * KiB)))
            os.pwrite(fd, data, off)
            model[off:off + len(data)] = data
            if i % 500 == 499:
                os.fsync(fd)
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    wait_for(lambda: _slices(redis_server, vol, ino) < 100, timeout=60, what="the chunk to be compacted")
    assert _stats(m).get("compactions", 0) >= 10
    assert f.read_bytes() == model
    m.remount(clear_cache=True)
    assert f.read_bytes() == model


def test_reader_of_an_old_slice_list_survives_compaction(make_volume, mount_volume, redis_server, s3_server):
    """Reader on one node resolves the chunk, the writer's node compacts it
    and (grace 0) deletes the old objects; the reader's next reads re-resolve
    instead of failing."""
    needs_mount()
    vol = make_volume("s3")
    writer = mount_volume(vol, None, "--compact-grace", "0")
    reader = mount_volume(vol, None, "--mem-cache-size", "1M", "--cache-size", "0")
    f = writer.path / "f"
    model = bytearray(os.urandom(8 * MiB))
    f.write_bytes(model)
    first_block = f"{vol.name}/chunks/0/0/1_0_{4 * MiB}"   # the writer's first slice (id 1)
    assert _exists(s3_server, vol.bucket, first_block)
    rfd = os.open(reader.path / "f", os.O_RDONLY)
    try:
        assert os.pread(rfd, MiB, 0) == model[:MiB]   # the reader now holds the slice list
        fd = os.open(f, os.O_RDWR)
        try:
            rng = random.Random(3)
            for _ in range(150):   # past COMPACT_AT: the writer's node compacts
                off = rng.randrange(0, len(model) - 100)
                os.pwrite(fd, b"Z" * 100, off)
                model[off:off + 100] = b"Z" * 100
                os.fsync(fd)
        finally:
            os.close(fd)
        ino = os.stat(f).st_ino
        wait_for(lambda: _slices(redis_server, vol, ino) < 100, timeout=60, what="compaction")
        wait_for(lambda: _stats(writer).get("compactions", 0) >= 1, timeout=30, what="a compaction")
        # the original slice's objects are gone now (grace 0, deleter runs every 10 s)
        wait_for(lambda: not _exists(s3_server, vol.bucket, first_block), timeout=40,
                 what="the old objects' deletion")
        os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = b"".join(os.pread(rfd, MiB, off) for off in range(0, len(model), MiB))
    finally:
        os.close(rfd)
    assert got == bytes(model)


def _exists(s3_server, bucket: str, key: str) -> bool:
    s3 = s3_server.client()
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError:
        return False
