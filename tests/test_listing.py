"""What a listing leaves behind must not make later operations in that
directory dearer: counted in Redis commands, not timed."""
from __future__ import annotations

import os
import time

import pytest

from helpers import new_dir

pytestmark = pytest.mark.usefixtures("own_servers")


def _hmget_calls(client) -> int:
    """HMGETs: attributes (one per inode) and batches of directory entries."""
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_renames_and_unlinks_after_a_listing_cost_no_batch_lookups(make_volume, mount_volume, redis_server):
    """After `ls`, the names of a listing are looked up 256 at a time when
    the kernel's entries expire. A rename or unlink in that directory must
    forget only its own names: forgetting the directory's whole entry cache
    made every later lookup fetch the next 256 names again (~256 HMGETs per
    rename, 15 x slower renames in the bench)."""
    vol = make_volume("file")
    m = mount_volume(vol, None)
    d = new_dir("many", parent=m.path)
    n = 600
    for i in range(n):
        os.close(os.open(d / f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
    client = redis_server.client()
    for op in ("rename", "unlink"):
        assert len(os.listdir(d)) == n
        time.sleep(1.1)   # the kernel's entries and attributes expire (1 s)
        before = _hmget_calls(client)
        for i in range(n):
            if op == "rename":
                os.rename(d / f"f{i:04d}", d / f"g{i:04d}")
            else:
                os.unlink(d / f"g{i:04d}")
        per_op = (_hmget_calls(client) - before) / n
        # ~2-7 (the directory's and the inode's attributes, a batch of 256
        # names per second); forgetting every name made it ~100.
        assert per_op < 30, f"{per_op:.1f} HMGETs per {op}"
    assert os.listdir(d) == []
