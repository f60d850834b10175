"""Data safety where real tools and odd files broke it: cp -a / rsync -a /
tar -xp keep modes (POSIX ACL xattrs are refused, so they chmod), files up to
the maximum size read back exactly, and truncating or deleting a huge sparse
file never blocks Redis and still deletes its objects."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import needs_mount
from helpers import MiB, wait_for
from jfscache.layout import CHUNK_SIZE, MAX_FILE_SIZE, slice_block_keys
from jfscache.meta.engine import Slice

MODES = {"exec.sh": 0o755, "shared.txt": 0o664, "group.txt": 0o640, "private.txt": 0o600,
         "readonly.txt": 0o444, "setgid-dir": 0o2775, "open-dir": 0o777, "team-dir": 0o750,
         "team-dir/inner.txt": 0o660}


def _build(root: Path) -> None:
    root.mkdir()
    for rel, mode in MODES.items():
        p = root / rel
        if rel.endswith("dir"):
            p.mkdir()
        else:
            p.write_bytes(rel.encode() * 100)
    for rel, mode in sorted(MODES.items(), key=lambda kv: -len(kv[0])):  # children first
        os.chmod(root / rel, mode)
    os.symlink("exec.sh", root / "link")
    os.chmod(root, 0o755)


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.filemode(st.st_mode), data)
    return out


@pytest.mark.parametrize("tool", ["cp -a", "rsync -a", "tar -xp"])
def test_copy_tools_keep_modes(mnt, tmp_dir, tool):
    """cp sets system.posix_acl_access and skips chmod when that succeeds:
    every copy came out 0600/0700. Each tool must keep every mode."""
    src, dst = tmp_dir / "src", mnt / "dst"
    _build(src)
    if tool == "cp -a":
        cmd = f"cp -a {src} {dst}"
    elif tool == "rsync -a":
        cmd = f"rsync -a {src}/ {dst}/"
    else:
        dst.mkdir()
        cmd = f"tar -C {src} -cf - . | tar -C {dst} -xpf -"
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _snapshot(dst) == _snapshot(src)


def test_posix_acl_and_selinux_xattrs_are_refused(mnt):
    """ACLs and SELinux labels are not stored (vfs.UNSUPPORTED_XATTRS): they
    answer EOPNOTSUPP, so tools fall back (chmod) or stop asking (ls -l)."""
    f = mnt / "f"
    f.write_bytes(b"x")
    acl = b"\x02\x00\x00\x00" + b"".join(   # user::rw- group::r-- other::r--, in xattr form
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + (0xFFFFFFFF).to_bytes(4, "little")
        for tag, perm in ((1, 6), (4, 4), (0x20, 4)))
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        target = mnt if name.endswith("default") else f
        for what, call, errnos in (("set", lambda: os.setxattr(target, name, acl), {errno.EOPNOTSUPP}),
                                   ("get", lambda: os.getxattr(target, name), {errno.EOPNOTSUPP, errno.ENODATA}),
                                   ("remove", lambda: os.removexattr(target, name), {errno.EOPNOTSUPP})):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno in errnos, (name, what, e.value)
    for what, call in (("set", lambda: os.setxattr(f, "security.selinux", b"system_u:object_r:fusefs_t:s0")),
                       ("get", lambda: os.getxattr(f, "security.selinux")),
                       ("remove", lambda: os.removexattr(f, "security.selinux"))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EOPNOTSUPP, ("security.selinux", what, e.value)
    os.setxattr(f, "user.kept", b"1")  # other xattrs still work
    assert os.getxattr(f, "user.kept") == b"1"
    os.setxattr(f, "security.capability", b"\x01\x00\x00\x02" + bytes(16))  # as setcap stores it
    assert os.getxattr(f, "security.capability") == b"\x01\x00\x00\x02" + bytes(16)


def test_limits_of_file_size(mnt, mnt_mount):
    """Up to MAX_FILE_SIZE everything reads back exactly, across chunk
    boundaries far out; at the limit writes are cut short or fail with
    EFBIG at the call itself, and so does a truncate past it."""
    f = mnt / "huge"
    tail = os.urandom(MiB + 123)
    edge = os.urandom(3000)
    far = 1 << 49   # a chunk boundary 512 TiB out
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, tail, MAX_FILE_SIZE - len(tail)) == len(tail)
        assert os.pwrite(fd, edge, far - 1500) == len(edge)
        assert os.pwrite(fd, b"abcdef", MAX_FILE_SIZE - 3) == 3   # cut short, as ext4 does
        for call in (lambda: os.pwrite(fd, b"x", MAX_FILE_SIZE), lambda: os.ftruncate(fd, MAX_FILE_SIZE + 1)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EFBIG
        os.fsync(fd)
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
    finally:
        os.close(fd)
    if mnt_mount is not None:
        mnt_mount.remount(clear_cache=True)   # read back from the store, not the cache
    want_tail = tail[:-3] + b"abc"
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        assert os.pread(fd, len(tail) + 10, MAX_FILE_SIZE - len(tail)) == want_tail
        assert os.pread(fd, 5000, far - 2500) == bytes(1000) + edge + bytes(1000)
        assert os.pread(fd, 4096, 1 << 40) == bytes(4096)
    finally:
        os.close(fd)


def _object_exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError:
        return False


@pytest.mark.parametrize("how", ["truncate", "unlink"])
def test_huge_sparse_file_is_cut_without_blocking_redis(how, mnt, mnt_volume, redis_server, s3_server):
    """A file written at the far end of the size range, then truncated to 0
    or deleted: no Redis command may run long (the old truncate looped over
    every chunk index up to the length, blocking every client for minutes),
    and the background deleter still removes the file's objects."""
    needs_mount()
    r = redis_server.client(int(mnt_volume.meta_url.rsplit("/", 1)[1]))
    f = mnt / "sparse"
    data = os.urandom(2 * MiB)
    off = MAX_FILE_SIZE - CHUNK_SIZE - MiB   # straddles the last two chunks
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
        slices = [Slice.unpack(b) for i in (off // CHUNK_SIZE, off // CHUNK_SIZE + 1)
                  for b in r.lrange(f"c{ino}_{i}", 0, -1)]
        keys = [k for s in slices for k in slice_block_keys(mnt_volume.name, s.id, s.size, 4 * MiB)]
        assert len(keys) == 2
        s3 = s3_server.client()
        assert all(_object_exists(s3, mnt_volume.bucket, k) for k in keys)
        r.config_set("slowlog-log-slower-than", 100_000)   # µs
        r.slowlog_reset()
        if how == "truncate":
            os.ftruncate(fd, 0)
            assert os.pread(fd, 10, 0) == b""
    finally:
        os.close(fd)
    if how == "unlink":
        os.unlink(f)
    try:
        def deleted():
            return (not any(_object_exists(s3, mnt_volume.bucket, k) for k in keys)
                    and r.llen("delchunks") == 0 and not r.exists(f"k{ino}")
                    and not any(m.startswith(b"%d:" % ino) for m in r.zrange("delfiles", 0, -1)))
        wait_for(deleted, timeout=30, what="the background deleter to remove the cut objects and chunk lists")
        slow = [e for e in r.slowlog_get(128) if e["duration"] > 1_000_000]
        assert not slow, f"Redis was blocked by: {slow}"
    finally:
        r.config_set("slowlog-log-slower-than", 10_000)
    if how == "truncate":   # growing it again reads zeros, not the old bytes
        with open(f, "r+b") as fh:
            fh.truncate(MAX_FILE_SIZE)
            fh.seek(off)
            assert fh.read(len(data)) == bytes(len(data))


def test_listing_cached_by_the_kernel_sees_other_nodes_changes(make_volume, mount_volume):
    """With --readdir-cache, repeated listings come from the kernel's cache (patched pyfuse3),
    but another node's create, unlink and rename show within the attribute
    timeout, and a stat pass over an old listing never returns a stale entry."""
    needs_mount()
    vol = make_volume("file")
    a, b = mount_volume(vol), mount_volume(vol, None, "--readdir-cache")
    d = a.path / "d"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"x")
    assert len(os.listdir(b.path / "d")) == 300
    assert len(os.listdir(b.path / "d")) == 300   # (served from the cache)
    (d / "new").write_bytes(b"new")
    os.unlink(d / "f000")
    os.rename(d / "f001", d / "g001")
    time.sleep(1.5)   # the attribute timeout (1 s)
    names = set(os.listdir(b.path / "d"))
    assert {"new", "g001"} <= names and not {"f000", "f001"} & names
    os.unlink(d / "f002")
    time.sleep(1.5)
    for name in sorted(names - {"f002"}):   # a stat pass (ls -l) over the old listing: fresh answers
        os.stat(b.path / "d" / name)
    with pytest.raises(FileNotFoundError):
        os.stat(b.path / "d" / "f002")


def test_deleted_files_objects_go_in_batch_requests(make_volume, mount_volume, s3_server, redis_server):
    """Removing a directory of small files deletes every object, with one
    S3 request per batch of files (DeleteObjects), not one per object: a
    deleted data set kept a third of the daemon's CPU busy with DELETEs. The
    Redis side goes in batches too: it took ~7 round trips per file, among
    them a SCRIPT LOAD each."""
    import json
    import shutil

    vol = make_volume("s3")
    m = mount_volume(vol, None)
    d = m.path / "many"
    d.mkdir()
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(os.urandom(1000 + i))
    s3 = s3_server.client()

    def objects() -> int:
        return s3.list_objects_v2(Bucket=vol.bucket).get("KeyCount", 0)

    def deletes() -> int:
        with open(m.path / ".stats") as f:
            return json.load(f).get("store_deletes", 0)

    def script_loads() -> int:
        return redis_server.client().info("commandstats").get("cmdstat_script|load", {}).get("calls", 0)

    assert objects() >= 300
    before, loads = deletes(), script_loads()
    shutil.rmtree(d)
    wait_for(lambda: objects() == 0, timeout=60, what="the deleter to remove the 300 files' objects")
    assert deletes() - before <= 10, deletes() - before   # one per object was 300
    assert script_loads() - loads <= 20, script_loads() - loads   # one per file was 300
