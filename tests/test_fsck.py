"""fsck and gc without a mount, each inconsistency constructed first: a
block missing from the store, a leaked chunk list, wrong counters, a dangling
entry, a dead session, orphan objects, and fragmented chunks for --compact."""
from __future__ import annotations

import json
import os
import time

import pytest

from helpers import MiB, assert_ok, run_cli
from jfscache.layout import slice_block_keys
from jfscache.meta.engine import Slice

pytestmark = pytest.mark.usefixtures("own_servers")



def _fsck(vol, *args):
    r = run_cli("fsck", vol.meta_url, "--json", *args, env=vol.env)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def _gc(vol, *args):
    return json.loads(assert_ok(run_cli("gc", vol.meta_url, "--json", *args, env=vol.env)).stdout)


def _blocks(vol, r, ino: int) -> list[str]:
    return [k for b in r.lrange(f"c{ino}_0", 0, -1) for s in [Slice.unpack(b)] if s.id
            for k in slice_block_keys(vol.name, s.id, s.size, 4 * MiB)]


def test_fsck_finds_and_repairs(make_volume, mount_volume, redis_server):
    vol = make_volume("file")
    m = mount_volume(vol)
    files = {name: os.urandom(5 * MiB + i) for i, name in enumerate(["lost", "leaked", "orphaned", "fine"])}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    ino = {name: os.stat(m.path / name).st_ino for name in files}
    m.umount()
    rc, rep = _fsck(vol)
    assert (rc, rep["problems"]) == (0, 0), rep
    r = redis_server.client(int(vol.meta_url.rsplit("/", 1)[1]))
    store = vol.bucket
    lost_block = _blocks(vol, r, ino["lost"])[1]
    os.unlink(os.path.join(store, lost_block))                       # a block missing from the store
    r.hdel("d1", "leaked")                                            # the file's inode and chunks leak:
    r.delete(f"i{ino['leaked']}")                                     #   a leaked chunk list
    orphan_keys = _blocks(vol, r, ino["orphaned"])
    r.delete(f"c{ino['orphaned']}_0", f"k{ino['orphaned']}")          # orphan objects
    r.set("usedSpace", 12345)                                         # wrong counters
    r.set("totalInodes", 999)
    r.hset("d1", "ghost", "f987654")                                  # a dangling entry
    r.zadd("sessions", {"4242": int(time.time()) - 100_000})          # a dead session
    rc, rep = _fsck(vol)
    assert rc == 1
    assert [b.get("block") for b in rep["missing_blocks"]] == [lost_block]
    assert rep["leaked_chunk_lists"] == [f"c{ino['leaked']}_0"]
    assert rep["used_space"]["counter"] == 12345 and rep["total_inodes"]["counter"] == 999
    assert rep["dangling_entries"] == [{"dir": 1, "name": "ghost"}]
    assert rep["dead_sessions"] == [4242]
    rc, rep = _fsck(vol, "--repair")
    assert rep["repaired"]
    rc, rep = _fsck(vol)
    assert rc == 1 and rep["problems"] == 1 and rep["missing_blocks_count"] == 1   # data loss stays reported
    assert r.get("usedSpace") != b"12345" and not r.hexists("d1", "ghost") and r.zscore("sessions", "4242") is None
    # gc: orphans are deleted on the run after the one that first saw them
    first = _gc(vol)
    assert first["orphan_slices"] >= 1 and first["deleted_objects"] == 0
    assert all(os.path.exists(os.path.join(store, k)) for k in orphan_keys)
    assert _gc(vol, "--dry-run")["deletable_slices"] >= 1
    second = _gc(vol)
    assert second["deleted_objects"] >= len(orphan_keys)
    assert not any(os.path.exists(os.path.join(store, k)) for k in orphan_keys)
    m.start()
    assert (m.path / "fine").read_bytes() == files["fine"]   # nothing referenced was touched
    assert sorted(os.listdir(m.path)) == ["fine", "lost", "orphaned"]


def test_gc_compact_defragments(make_volume, mount_volume, redis_server):
    vol = make_volume("file")
    m = mount_volume(vol)
    model = bytearray(os.urandom(3 * MiB))
    f = m.path / "frag"
    f.write_bytes(model)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(60):   # below the background threshold: stays fragmented
            off = (i * 48271) % (len(model) - 1000)
            os.pwrite(fd, bytes([i]) * 1000, off)
            model[off:off + 1000] = bytes([i]) * 1000
            os.fsync(fd)
        ino = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    m.umount()
    r = redis_server.client(int(vol.meta_url.rsplit("/", 1)[1]))
    assert r.llen(f"c{ino}_0") == 61
    rep = _gc(vol, "--compact")
    assert rep["compacted_chunks"] == 1
    assert r.llen(f"c{ino}_0") == 1
    m.start()
    assert f.read_bytes() == model
