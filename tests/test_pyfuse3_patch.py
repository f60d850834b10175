"""The pyfuse3 patch that .ci/setup builds (.ci/patches/pyfuse3-*.patch):

- ``Operations.fallocate(fh, mode, offset, length)`` receives fallocate(2)
  and posix_fallocate(3) with the caller's mode, offset and length, and its
  FUSEError reaches the caller;
- ``opendir`` may return a ``FileInfo`` whose ``cache_readdir`` (and
  ``keep_cache``) make the kernel cache the listing, while returning an int
  still works as before;
- ``FileInfo.noflush`` from ``open`` spares the FLUSH request at close;
- ``main(spin_us=N)`` polls the device before it waits (the test file
  system is served that way, so every test goes through that path);
- ``Operations.enable_readdirplus_auto`` lets the kernel send plain
  READDIR requests, which reach ``readdir`` with ``token.plus`` False.

A tiny pyfuse3 file system (this file, run as a script) is mounted in a
subprocess that logs every handler call as a JSON line; the tests count them.
Needs /dev/fuse and root (or fusermount3), like the rest of the suite.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

FILE_INO = 5
FILE_FH = 77
FILE_SIZE = 1 << 20
ENOSPC_LENGTH = 12345  # fallocate() of this length fails with ENOSPC

# name -> (inode, what opendir returns: "keep" = FileInfo(cache_readdir,
# keep_cache), "nokeep" = FileInfo(cache_readdir, keep_cache=False), "int"
# = a plain file handle as before the patch)
DIRS = {b"cached": (2, "keep"), b"nokeep": (3, "nokeep"), b"plain": (4, "int"), b"many": (6, "int")}
DIR_INODES = {ino: kind for ino, kind in DIRS.values()}
CHILDREN = (b"a", b"b", b"c")
# "many" holds MANY files, inodes MANY_BASE + 1...: listings of several requests
MANY, MANY_BASE = 3000, 10_000


# --------------------------------------------------------------------------
# the file system (runs in the child process)

class PatchFS(pyfuse3.Operations):
    enable_readdirplus_auto = True

    def __init__(self, log_path: str) -> None:
        super().__init__()
        self.log = open(log_path, "a", buffering=1)

    def _log(self, *rec) -> None:
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        if ino == pyfuse3.ROOT_INODE or ino in DIR_INODES:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif ino == FILE_INO or ino // 100 in DIR_INODES or MANY_BASE < ino <= MANY_BASE + MANY:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = FILE_SIZE if ino == FILE_INO else 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = ino
        a.st_blksize = 4096  # glibc's readdir then asks for 32 KiB at a time
        a.entry_timeout = a.attr_timeout = 300
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_700_000_000 * 10**9
        return a

    def _children(self, ino: int) -> list[tuple[bytes, int]]:
        if ino == pyfuse3.ROOT_INODE:
            return sorted([(n, i) for n, (i, _) in DIRS.items()]
                          + [(b"file", FILE_INO)], key=lambda e: e[1])
        if ino == 6:
            return [(b"m%05d" % k, MANY_BASE + k) for k in range(1, MANY + 1)]
        return [(n, ino * 100 + k) for k, n in enumerate(CHILDREN, 1)]

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        for n, ino in self._children(parent_inode):
            if n == name:
                return self._attr(ino)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        self._log("opendir", inode)
        kind = DIR_INODES.get(inode, "int")
        if kind == "int":
            return 1000 + inode
        return pyfuse3.FileInfo(fh=1000 + inode, cache_readdir=True,
                                keep_cache=(kind == "keep"))

    async def readdir(self, fh, start_id, token):
        self._log("readdir", fh, start_id, token.plus)
        for name, ino in self._children(fh - 1000):
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), ino):
                break

    async def releasedir(self, fh):
        pass

    async def setxattr(self, inode, name, value, ctx):
        if name == b"user.invalidate":
            pyfuse3.invalidate_inode(inode)
            return
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # read-only opens need no flush at close
        return pyfuse3.FileInfo(fh=FILE_FH, noflush=flags & os.O_ACCMODE == os.O_RDONLY)

    async def release(self, fh):
        pass

    async def flush(self, fh):
        self._log("flush", fh)

    async def fallocate(self, fh, mode, offset, length):
        self._log("fallocate", fh, mode, offset, length)
        if length == ENOSPC_LENGTH:
            raise pyfuse3.FUSEError(errno.ENOSPC)


def serve(mountpoint: str, log_path: str) -> None:
    import trio

    opts = set(pyfuse3.default_options)
    opts.add("fsname=pyfuse3-patch-test")
    pyfuse3.init(PatchFS(log_path), mountpoint, opts)
    try:
        # spin_us: every test below also runs through the polling read path
        trio.run(functools.partial(pyfuse3.main, spin_us=50))
    finally:
        pyfuse3.close(unmount=True)


# --------------------------------------------------------------------------
# the tests

import pytest  # noqa: E402


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                               ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Mounted:
    def __init__(self, mnt: Path, log: Path) -> None:
        self.mnt = mnt
        self.log = log

    def calls(self, op: str) -> list[list]:
        if not self.log.exists():
            return []
        recs = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r[1:] for r in recs if r[0] == op]


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture(scope="module")
def patchfs(tmp_path_factory):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    base = tmp_path_factory.mktemp("pyfuse3-patch")
    mnt = base / "mnt"
    mnt.mkdir()
    log = base / "calls.jsonl"
    out = open(base / "fs.out", "wb")
    proc = subprocess.Popen([sys.executable, __file__, str(mnt), str(log)],
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not _mounted(str(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("test fs did not mount:\n"
                                   + (base / "fs.out").read_text())
            time.sleep(0.02)
        yield Mounted(mnt, log)
    finally:
        if _mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        out.close()
        assert not _mounted(str(mnt))
        assert proc.returncode == 0, (base / "fs.out").read_text()


def test_patched_pyfuse3_api():
    assert hasattr(pyfuse3.Operations, "fallocate"), \
        "unpatched pyfuse3 in this venv: run bash .ci/setup"
    assert "+jfscache" in pyfuse3.__version__
    fi = pyfuse3.FileInfo(fh=3, cache_readdir=True)
    assert (fi.fh, fi.cache_readdir, fi.keep_cache) == (3, True, True)
    assert pyfuse3.FileInfo().cache_readdir is False
    assert pyfuse3.FileInfo().noflush is False and pyfuse3.FileInfo(noflush=True).noflush is True


def test_noflush(patchfs):
    before = len(patchfs.calls("flush"))
    for _ in range(3):
        os.close(os.open(patchfs.mnt / "file", os.O_RDONLY))
    assert len(patchfs.calls("flush")) == before       # opened with noflush
    os.close(os.open(patchfs.mnt / "file", os.O_RDWR))
    assert len(patchfs.calls("flush")) == before + 1   # a read-write open is flushed


def test_fallocate_modes(patchfs):
    with open(patchfs.mnt / "file", "r+b") as f:
        fd = f.fileno()
        os.posix_fallocate(fd, 0, 8192)
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 4096, 65536)
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 200)
        with pytest.raises(OSError) as e:
            _fallocate(fd, 0, 0, ENOSPC_LENGTH)
        assert e.value.errno == errno.ENOSPC
    assert patchfs.calls("fallocate") == [
        [FILE_FH, 0, 0, 8192],
        [FILE_FH, FALLOC_FL_KEEP_SIZE, 4096, 65536],
        [FILE_FH, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 200],
        [FILE_FH, 0, 0, ENOSPC_LENGTH],
    ]


def test_fallocate_zero_range(patchfs):
    before = len(patchfs.calls("fallocate"))
    with open(patchfs.mnt / "file", "r+b") as f:
        try:
            _fallocate(f.fileno(), FALLOC_FL_ZERO_RANGE, 512, 1024)
        except OSError as e:
            # kernels before 5.14 refuse ZERO_RANGE on FUSE themselves
            assert e.errno == errno.EOPNOTSUPP
            assert len(patchfs.calls("fallocate")) == before
            pytest.skip("this kernel does not forward FALLOC_FL_ZERO_RANGE")
    assert patchfs.calls("fallocate")[before:] == [
        [FILE_FH, FALLOC_FL_ZERO_RANGE, 512, 1024]]


def _readdirs(patchfs, ino: int) -> int:
    return sum(1 for fh, *_ in patchfs.calls("readdir") if fh == 1000 + ino)


def test_cache_readdir(patchfs):
    d = patchfs.mnt / "cached"
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    first = _readdirs(patchfs, 2)
    assert first >= 1
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert _readdirs(patchfs, 2) == first      # served from the kernel cache
    assert [c for c in patchfs.calls("opendir") if c == [2]] == [[2]] * 3

    # invalidate_inode() on the directory drops the cached listing
    os.setxattr(d, "user.invalidate", b"1")
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert _readdirs(patchfs, 2) == 2 * first


def test_cache_readdir_without_keep_cache(patchfs):
    # without keep_cache, every opendir discards the cached listing
    d = patchfs.mnt / "nokeep"
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    first = _readdirs(patchfs, 3)
    assert first >= 1
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert _readdirs(patchfs, 3) == 2 * first


def test_opendir_returning_int_still_works(patchfs):
    d = patchfs.mnt / "plain"
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    first = _readdirs(patchfs, 4)
    assert first >= 1
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert _readdirs(patchfs, 4) == 2 * first   # no caching, as before
    assert os.stat(d / "b").st_ino == 402


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])


def _plus_flags(patchfs, since: int) -> list[bool]:
    return [plus for fh, _start, plus in patchfs.calls("readdir")[since:] if fh == 1006]


def test_readdirplus_auto(patchfs):
    d = patchfs.mnt / "many"
    # A plain listing: attributes only in the first request, then READDIR.
    # The entries' types still arrive (d_type), without a stat.
    before = len(patchfs.calls("readdir"))
    with os.scandir(d) as it:
        entries = [(e.name, e.inode(), e.is_file(follow_symlinks=False)) for e in it]
    assert entries == [("m%05d" % k, MANY_BASE + k, True) for k in range(1, MANY + 1)]
    plus = _plus_flags(patchfs, before)
    assert len(plus) >= 3 and plus[0] and not any(plus[1:]), plus

    # A listing whose entries are looked up as they come (ls -l): the kernel
    # keeps asking for attributes.
    before = len(patchfs.calls("readdir"))
    with os.scandir(d) as it:
        sizes = [os.stat(e.path).st_size for e in it]
    assert sizes == [0] * MANY
    plus = _plus_flags(patchfs, before)
    assert len(plus) >= 3 and all(plus), plus
