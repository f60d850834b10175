"""O_APPEND from many nodes: each record lands at the file's true end at
commit time, atomically across nodes, so appends from several mounts of one
volume to one shared log keep every line, each whole (JuiceFS CE loses the
lines of all but one node here)."""
from __future__ import annotations

import os
import threading

import pytest

pytestmark = pytest.mark.usefixtures("own_servers")



def _append_lines(path, tag: str, n: int, fsync: bool, errors: list) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for i in range(n):
                os.write(fd, f"{tag} line {i:05d} {'x' * (i % 50)}\n".encode())
                if fsync:
                    os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        errors.append(f"{tag}: {e}")


def _check(text: str, tags: list[str], n: int) -> None:
    lines = text.splitlines()
    want = {f"{t} line {i:05d} {'x' * (i % 50)}" for t in tags for i in range(n)}
    assert len(lines) == len(want), f"{len(lines)} lines, expected {len(want)}"
    assert set(lines) == want
    for t in tags:   # each writer's lines stay in its own order
        mine = [ln for ln in lines if ln.startswith(t + " ")]
        assert mine == sorted(mine)


@pytest.mark.parametrize("nodes,lines,fsync", [(2, 50, True), (4, 300, True), (3, 2000, False)])
def test_appends_from_many_mounts_keep_every_line(nodes, lines, fsync, make_volume, mount_volume):
    vol = make_volume("file")
    mounts = [mount_volume(vol) for _ in range(nodes)]
    (mounts[0].path / "shared.log").write_bytes(b"")
    errors: list[str] = []
    tags = [f"node{k}" for k in range(nodes)]
    threads = [threading.Thread(target=_append_lines, args=(m.path / "shared.log", t, lines, fsync, errors))
               for m, t in zip(mounts, tags)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for m in mounts:   # every node reads the same, whole file
        fd = os.open(m.path / "shared.log", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            text = b"".join(iter(lambda: os.read(fd, 1 << 20), b"")).decode()
        finally:
            os.close(fd)
        _check(text, tags, lines)


def test_append_on_one_node_with_reads_between(mnt):
    p = mnt / "log"
    with open(p, "a") as f:
        f.write("one\n")
    with open(p, "a") as f:
        f.write("two\n")
        f.flush()
        assert p.read_text() == "one\ntwo\n"
        f.write("three\n")
    assert p.read_text() == "one\ntwo\nthree\n"
    assert os.stat(p).st_size == len("one\ntwo\nthree\n")


def test_dropping_a_split_slice_reference_twice_keeps_the_other(redis_server):
    """An append that crosses a chunk boundary is one slice referenced by two
    chunks (sliceRef). Dropping the first reference again, as the delete loop
    does after a lost Redis reply, must not count as the second: that would
    delete objects the other chunk still reads."""
    import trio

    from jfscache.meta.engine import Meta
    db = redis_server.new_db()
    r = redis_server.client(db)
    r.hset("sliceRef", "7", 1)

    async def main():
        m = Meta(redis_server.url(db))
        try:
            assert await m.unref([(7, "100:50")]) == []
            assert await m.unref([(7, "100:50")]) == []   # again: still one reference left
            assert await m.unref([(7, "0:100")]) == [7]
            assert await m.unref([(9, "0:10")]) == [9]    # one reference: gone at once,
            assert await m.unref([(9, "0:10")]) == [9]    # and again only deletes deleted objects
        finally:
            await m.r.aclose()

    trio.run(main)
    assert not r.exists("sliceRef") and not r.exists("sliceUnref")
