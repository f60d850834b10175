"""fsx (tests/fsx.py) through real mounts of an S3 volume: random writes,
reads, mmap reads and writes, truncates, every fallocate mode, fsyncs and
reopens of one file, checked against an in-memory model, with remounts on an
empty cache; and two workers on two mounts of one volume while `jfscache gc
--compact` and the daemons' own compaction run.

The seeds are fixed; FSX_SEED=N runs other streams (the failure message
names the seed and the op log tail). FSX_OPS scales the op counts.

test_gc_compact_survives_slices_removed_meanwhile is the bug the two-mount
run found (gc --compact aborted with MissingBlock when slices it was
compacting were removed meanwhile), made certain by pausing gc.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

import fsx
from conftest import needs_mount
from helpers import MiB, new_dir, run_cli, wait_for

SEED = int(os.environ.get("FSX_SEED", "20261202"))
SCALE = float(os.environ.get("FSX_OPS", "1"))


def _crossing(history, boundary_of) -> int:
    """Ops of the log whose range crosses a boundary."""
    n = 0
    for rec in history:
        _, kind, a, b = rec[:4]
        if kind in ("write", "mapwrite", "read", "mapread", *fsx.FALLOC_MODES) and b > 1:
            if boundary_of(a) != boundary_of(a + b - 1):
                n += 1
    return n


def _stats(m) -> dict:
    return json.loads((m.path / ".stats").read_text())


def test_fsx_single_mount_with_remounts(make_volume, mount_volume):
    needs_mount()
    vol = make_volume("s3")
    m = mount_volume(vol)
    ops = int(1200 * SCALE)
    every = ops // 3 + 1          # two remounts, and the final verify
    remounts = []

    def remount():
        t = time.monotonic()
        m.remount(clear_cache=True)   # the cache dir emptied: the verify reads from S3
        remounts.append(time.monotonic() - t)

    x = fsx.Fsx(m.path / "fsx.bin", seed=SEED, remount=remount, remount_every=every,
                name="single")
    try:
        summary = x.run(ops)
    finally:
        x.close()
    print(json.dumps(summary, indent=1))
    assert summary["mismatches"] == 0 and summary["errors"] == 0
    assert summary["ops"] == ops
    missing = [k for k in fsx.KINDS if summary["per_kind"][k] == 0]
    assert not missing, f"op kinds that never ran: {missing}"
    assert summary["remounts"] >= 2 and len(remounts) >= 2
    # the boundaries the stream is meant to cross were crossed
    assert _crossing(x.history, lambda p: p // fsx.BLOCK) >= 50
    assert _crossing(x.history, lambda p: p // fsx.CHUNK) >= 5
    assert summary["final_size"] > 0


def test_fsx_two_mounts_with_gc_and_compaction(make_volume, mount_volume):
    needs_mount()
    vol = make_volume("s3")
    # a short grace: objects of compacted slices are deleted while the
    # workers run, under gc's compactor too
    a = mount_volume(vol, None, "--compact-grace", "10")
    b = mount_volume(vol, None, "--compact-grace", "10")
    gc_reports: list[dict] = []

    def gc():
        r = run_cli("gc", vol.meta_url, "--compact", "--json", env=vol.env, timeout=120)
        if r.returncode == 0:
            gc_reports.append(json.loads(r.stdout))
        return r

    # the workers go on until gc has run twice while they work (on a fast
    # day, 800 ops were over before the second run)
    res = fsx.run_pair(a.path, b.path, SEED, int(800 * SCALE), profile="compact",
                       background=gc, background_interval=1.5, min_background_runs=2)
    print(json.dumps(res, indent=1))
    assert not res["background_errors"], res["background_errors"]
    assert res["background_runs"] >= 2, "gc ran fewer than twice during the workers' run"
    assert len(gc_reports) == res["background_runs"], "a gc run failed"
    for w in res["workers"]:
        assert w["mismatches"] == 0 and w["errors"] == 0
        missing = [k for k in fsx.KINDS if w["per_kind"][k] == 0]
        assert not missing, f"{w['name']}: op kinds that never ran: {missing}"
    assert len(res["cross_verified"]) == 2
    compactions = _stats(a).get("compactions", 0) + _stats(b).get("compactions", 0)
    gc_compacted = sum(r.get("compacted_chunks", 0) for r in gc_reports)
    print(f"daemon compactions: {compactions}, chunks compacted by gc: {gc_compacted}")
    assert compactions >= 1, "no chunk reached the daemons' compaction threshold"
    # (gc's compactions are not asserted: a chunk the workers change while
    # gc compacts it is left as it is, which is right, and common here)
    # and nothing the files reference is missing from the object store
    r = run_cli("fsck", vol.meta_url, "--json", env=vol.env, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads(r.stdout)
    print(f"fsck: {report['problems']} problems")
    assert report["missing_blocks_count"] == 0, report["missing_blocks"]


def test_fsx_detects_what_it_should(tmp_dir):
    """The checker itself, on a local file system: a clean run passes, and
    bytes changed behind its back (stale data of an earlier op, a lost
    truncate) are caught with the offset and the op that wrote them."""
    x = fsx.Fsx(tmp_dir / "f", seed=SEED, max_size=12 * fsx.MiB)
    summary = x.run(400)
    assert summary["mismatches"] == 0 and all(summary["per_kind"][k] for k in ("write", "read"))
    off = len(x.model) // 3
    fd = os.open(tmp_dir / "f", os.O_RDWR)
    try:
        os.pwrite(fd, bytes(x.data(7, off, 100)), off)   # what op #7 would have written there
    finally:
        os.close(fd)
    with pytest.raises(fsx.Mismatch) as e:
        x.verify_all(drop=True)
    msg = str(e.value)
    assert f"differ at file offset {off:#x}" in msg and "n % 251 == 7" in msg
    assert f"seed {SEED}" in msg and "last 20 ops" in msg
    os.truncate(tmp_dir / "f", len(x.model) + 1)
    with pytest.raises(fsx.Mismatch, match="size"):
        x.step((x.n + 1, "fsync", 0, 0))
    x.close()


# A gc process whose compactor pauses after it has read a chunk's slice list
# (jfscache.vfs.compact.read_segments is wrapped) until told to go on.
_PAUSED_GC = r"""
import os, sys, trio
import jfscache.vfs.compact as c
orig, sync = c.read_segments, sys.argv[1]
async def paused(*a, **k):
    open(sync + "/raw-read", "w").close()
    while not os.path.exists(sync + "/go"):
        await trio.sleep(0.1)
    return await orig(*a, **k)
c.read_segments = paused
sys.argv = ["jfscache", "gc", sys.argv[2], "--compact"]
from jfscache.cli import main
main()
"""


@pytest.mark.parametrize("how", ["truncate", "grace0-compaction"])
def test_gc_compact_survives_slices_removed_meanwhile(how, make_volume, mount_volume):
    """gc --compact reads a chunk's slice list; then (gc paused there, to
    make the race certain) a mount removes those slices' objects: a
    truncate to 0 (default options: a cut chunk's objects are deleted at
    once; an unlink does the same), or, with --compact-grace 0, its own
    compaction of the chunk and its deleter. Then gc reads the blocks. It
    should skip that chunk (it changed, as when compact_commit finds it
    changed) and finish its run (it used to exit 1 with MissingBlock and
    delete no garbage in that run). No data is lost (fsck is clean)."""
    needs_mount()
    vol = make_volume("file")
    m = mount_volume(vol, None, *(["--compact-grace", "0"] if how == "grace0-compaction" else []))
    path = m.path / "f"
    rng = random.Random(1)
    model = bytearray(rng.randbytes(8 * MiB))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, model, 0)
        os.fsync(fd)

        def small_writes(n):
            for _ in range(n):
                off, data = rng.randrange(0, 8 * MiB - 4096), rng.randbytes(4096)
                os.pwrite(fd, data, off)
                model[off:off + 4096] = data
                os.fsync(fd)

        small_writes(60)                     # 61 slices: below the mount's threshold (100)
        sync = new_dir("sync")
        gc = subprocess.Popen([sys.executable, "-c", _PAUSED_GC, str(sync), vol.meta_url],
                              env=vol.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        try:
            wait_for(lambda: (sync / "raw-read").exists() or gc.poll() is not None, timeout=60,
                     what="gc to read the slice list")
            assert gc.poll() is None, gc.communicate()[0]
            if how == "truncate":
                os.ftruncate(fd, 0)
                del model[:]
            else:
                before = _stats(m).get("compactions", 0)
                small_writes(50)             # past 100: the mount compacts the chunk
                wait_for(lambda: _stats(m).get("compactions", 0) > before, timeout=60,
                         what="the mount's compaction")
            first = f"{vol.bucket}/{vol.name}/chunks/0/0/1_0_{4 * MiB}"   # slice 1's first block
            wait_for(lambda: not os.path.exists(first), timeout=30, what="the deleter")
            (sync / "go").touch()
            out, _ = gc.communicate(timeout=120)
        finally:
            if gc.poll() is None:
                gc.kill()
                gc.wait()
    finally:
        os.close(fd)
    assert path.read_bytes() == model        # no data lost either way
    r = run_cli("fsck", vol.meta_url, "--json", env=vol.env, timeout=120)
    assert json.loads(r.stdout)["missing_blocks_count"] == 0
    assert gc.returncode == 0, f"gc --compact failed: {out.strip()}"
