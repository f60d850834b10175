"""The tiered block cache, seen through a real mount: bounds, corruption,
restart, a broken cache disk, and two nodes with caches of one file."""
import hashlib
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import assert_clean_error, is_mounted, new_dir, run_cli, wait_for

MiB = 1 << 20
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs mounts)")


def stats(mp) -> dict:
    with open(os.path.join(mp, ".stats")) as f:
        return json.load(f)


def write_random(path, size, seed) -> str:
    """Write `size` pseudo-random bytes, fsync, return their sha256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for done in range(0, size, MiB):
            piece = rng.randbytes(min(MiB, size - done))
            f.write(piece)
            h.update(piece)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def read_hash(path, check=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MiB)
            if not b:
                break
            h.update(b)
            if check:
                check()
    return h.hexdigest()


def cache_bytes(cache_dir) -> int:
    """Bytes of block files (and in-flight temporary files) in a cache dir."""
    total = 0
    for root, _, files in os.walk(Path(cache_dir) / "blocks"):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:  # renamed or evicted while we looked
                pass
    return total


def block_files(cache_dir) -> list[Path]:
    return sorted(p for p in (Path(cache_dir) / "blocks").rglob("*") if p.is_file())


def test_disk_tier_stays_within_cache_size(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol, None, "--cache-size", "32", "--mem-cache-size", "8")
    digest = write_random(m.path / "big", 96 * MiB, seed=3)
    peak = 0

    def check():
        nonlocal peak
        peak = max(peak, cache_bytes(m.cache_dir))
        assert peak <= 32 * MiB

    m.remount()
    assert read_hash(m.path / "big", check) == digest
    s = stats(m.path)
    assert s.get("disk_evictions", 0) > 0
    assert s.get("store_gets", 0) > 0
    assert cache_bytes(m.cache_dir) <= 32 * MiB


def test_corrupt_cache_block_is_refetched(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    digest = write_random(m.path / "f", 12 * MiB, seed=5)
    m.umount()
    files = block_files(m.cache_dir)
    assert len(files) == 3
    for p in files:  # flip bytes in the middle of every cached block
        with open(p, "r+b") as f:
            f.seek(1000)
            b = f.read(16)
            f.seek(1000)
            f.write(bytes(x ^ 0xFF for x in b))
    m.start()
    assert read_hash(m.path / "f") == digest
    s = stats(m.path)
    # Concurrent reads of one corrupt block may each notice it; each block is
    # fetched again exactly once.
    assert s.get("disk_corrupt", 0) >= 3
    assert s.get("store_gets", 0) == 3
    assert "corrupt" in m.log_tail(50)


def test_restart_rereads_without_store_gets(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    digest = write_random(m.path / "f", 20 * MiB, seed=7)
    m.remount()
    assert read_hash(m.path / "f") == digest
    s = stats(m.path)
    assert s.get("store_gets", 0) == 0, s
    assert s.get("disk_hit_bytes", 0) >= 20 * MiB  # (prefetch may read some bytes twice)


def test_written_file_reads_back_without_store(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    digest = write_random(m.path / "f", 9 * MiB, seed=8)
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    assert read_hash(m.path / "f") == digest
    assert stats(m.path).get("store_gets", 0) == 0


def _tmpfs(path: Path, size: str, ro: bool = False) -> None:
    opts = f"size={size},mode=0755" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def _untmpfs(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@root_only
def test_full_cache_disk_still_reads(make_volume, mount_volume):
    vol = make_volume("s3")
    cache = new_dir("smallcache")
    _tmpfs(cache, "6m")
    try:
        # Something else filled the disk: eviction cannot make room.
        with open(cache / "filler", "wb") as f:
            f.write(b"x" * 4 * MiB)
        m = mount_volume(vol, None, cache_dir=cache)
        digest = write_random(m.path / "f", 24 * MiB, seed=9)
        m.remount()
        assert read_hash(m.path / "f") == digest
        assert stats(m.path).get("disk_write_errors", 0) >= 1
        m.umount()
        log = m.log_path.read_text()
        assert log.count("is full") == 2, log  # one per start (the log spans two), not one per block
    finally:
        _untmpfs(cache)


@root_only
def test_read_only_cache_dir_is_refused(make_volume, mounts):
    """A cache dir that cannot be used at start is bad input: the mount would
    otherwise run without the cache it was asked for (and read everything
    from the store). One line, non-zero exit, nothing mounted."""
    vol = make_volume("s3")
    cache = new_dir("rocache")
    _tmpfs(cache, "16m", ro=True)
    try:
        mp = new_dir("mnt")
        mounts.track_mountpoint(mp)
        r = run_cli("mount", vol.meta_url, str(mp), "--cache-dir", str(cache / "sub"), env=vol.env)
        assert_clean_error(r, rf"cache dir {re.escape(str(cache / 'sub'))} is unusable: Read-only file system")
        assert not is_mounted(mp)
    finally:
        _untmpfs(cache)


def test_other_node_reads_rewritten_file(make_volume, mount_volume):
    vol = make_volume("s3")
    a = mount_volume(vol, None, "--attr-timeout", "1", "--entry-timeout", "1")
    b = mount_volume(vol, None, "--attr-timeout", "1", "--entry-timeout", "1")
    old = write_random(a.path / "f", 6 * MiB, seed=11)
    wait_for(lambda: (b.path / "f").exists(), timeout=10)
    assert read_hash(b.path / "f") == old  # now cached on b (memory, disk, pages)
    new = write_random(a.path / "f", 6 * MiB, seed=12)  # O_TRUNC rewrite, same size
    assert new != old
    deadline = time.monotonic() + 10
    while read_hash(b.path / "f") != new:
        assert time.monotonic() < deadline, "b never saw a's rewrite"
        time.sleep(0.2)


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing for pid {pid}")


def test_write_buffer_is_bounded(make_volume, mount_volume):
    """A fast writer is slowed down, not buffered without bound: the daemon's
    peak memory stays near its limits while 512 MiB stream through it."""
    vol = make_volume("s3")
    m = mount_volume(vol, None, "--buffer-size", "16", "--mem-cache-size", "16", "--max-uploads", "4")
    with open(m.path / "warmup", "wb") as f:  # load the code paths first
        f.write(os.urandom(MiB))
    base = _rss_kib(m.pid, "VmRSS")
    chunk = os.urandom(MiB)
    with open(m.path / "big", "wb") as f:
        for _ in range(512):
            f.write(chunk)
        os.fsync(f.fileno())
    grown = (_rss_kib(m.pid, "VmHWM") - base) // 1024
    # 16 MiB buffer + 16 MiB memory tier + 64 MiB disk-cache queue + slack
    assert grown < 160, f"daemon grew by {grown} MiB while writing"
    assert os.path.getsize(m.path / "big") == 512 * MiB
