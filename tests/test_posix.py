"""POSIX behaviour of a mounted jfscache, checked with plain `os` calls.

Every test works in `mnt`, a fresh empty directory (mode 0777) on the mount
(tests/conftest.py). With JFSCACHE_TEST_DIR set, `mnt` is a directory of a
plain kernel filesystem instead: the same tests then check themselves
against ext4/tmpfs. Where an error is expected the exact errno is checked.

The mount uses `default_permissions` and 1 s attribute/entry timeouts; every
check here goes through the one mount that made the change, so the kernel's
caches are invalidated by the change itself and no test has to wait them out.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
ON_KERNEL_FS = bool(os.environ.get("JFSCACHE_TEST_DIR"))

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4 * MiB     # jfscache block size
CHUNK = 64 * MiB    # jfscache chunk size

# ---------------------------------------------------------------- helpers

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                           ctypes.c_char_p, ctypes.c_uint]
libc.renameat2.restype = ctypes.c_int


def renameat2(old, new, flags):
    r = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p,
                           ctypes.POINTER(timespec), ctypes.c_int]
libc.utimensat.restype = ctypes.c_int


def utimensat(path, atime, mtime, flags=0):
    """atime/mtime: an int of nanoseconds, or UTIME_NOW / UTIME_OMIT as
    ('special', UTIME_x)."""
    def ts(v):
        if isinstance(v, tuple):
            return timespec(0, v[1])
        return timespec(v // 10**9, v % 10**9)
    times = (timespec * 2)(ts(atime), ts(mtime))
    if libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


NOW = ("special", UTIME_NOW)
OMIT = ("special", UTIME_OMIT)


class dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


libc.opendir.argtypes = [ctypes.c_char_p]
libc.opendir.restype = ctypes.c_void_p
libc.readdir64.argtypes = [ctypes.c_void_p]
libc.readdir64.restype = ctypes.POINTER(dirent64)
libc.closedir.argtypes = [ctypes.c_void_p]
DT_FIFO, DT_DIR, DT_REG, DT_LNK = 1, 4, 8, 10


def raw_readdir(path):
    """[(name bytes, d_ino, d_type)] as libc readdir() returns them,
    '.' and '..' included."""
    d = libc.opendir(os.fsencode(path))
    if not d:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    out = []
    try:
        while True:
            ctypes.set_errno(0)
            p = libc.readdir64(d)
            if not p:
                e = ctypes.get_errno()
                if e:
                    raise OSError(e, os.strerror(e), str(path))
                return out
            ent = p.contents
            out.append((ent.d_name, ent.d_ino, ent.d_type))
    finally:
        libc.closedir(d)


def expect_errno(eno, fn, *args, **kwargs):
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    got = ei.value.errno
    assert got == eno, (f"{getattr(fn, '__name__', fn)}: expected "
                        f"{errno.errorcode[eno]}, got {errno.errorcode.get(got, got)}")
    return ei.value


def write_file(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd, data, offset=None):
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if offset is None:
            n = os.write(fd, view[pos:])
        else:
            n = os.pwrite(fd, view[pos:], offset + pos)
        assert n > 0
        pos += n


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def pread_all(fd, size, offset):
    out = bytearray()
    while len(out) < size:
        b = os.pread(fd, size - len(out), offset + len(out))
        if not b:
            break
        out += b
    return bytes(out)


def drop_page_cache(fd):
    """Make the next reads of this file come from the filesystem rather
    than the kernel's page cache (clean pages only: fsync first)."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def tick():
    """Let the clock move on, so that a ctime set after this differs from
    one set before (kernel timestamps can be as coarse as a jiffy)."""
    time.sleep(0.03)


OLD_NS = 1_000_000_000_123_456_789   # 2001-09-09, well in the past


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def run_py(code, *args, check=True):
    """Run python code in a child process; return its stdout (stripped)."""
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p.stdout.strip()


# ------------------------------------------------- lookup / stat / getattr

def test_stat_new_file_fields(mnt, umask0):
    t0 = time.time_ns()
    f = mnt / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_nlink == 1
        assert st.st_uid == os.geteuid()
        assert st.st_gid == os.getegid()
        assert st.st_size == 0
        assert st.st_blksize > 0
        os.write(fd, b"hello")
        assert os.fstat(fd).st_size == 5
    finally:
        os.close(fd)
    t1 = time.time_ns()
    st = os.stat(f)
    assert st.st_size == 5
    for t in (st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns):
        assert t0 - 2 * 10**9 <= t <= t1 + 2 * 10**9


def test_stat_lstat_fstat_agree(mnt):
    f = mnt / "f"
    write_file(f, b"x" * 1000)
    os.symlink("f", mnt / "l")
    st, lst = os.stat(f), os.lstat(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        fst = os.fstat(fd)
    finally:
        os.close(fd)
    for a in (lst, fst, os.stat(mnt / "l")):
        assert (a.st_ino, a.st_dev, a.st_mode, a.st_size, a.st_nlink, a.st_mtime_ns) == \
               (st.st_ino, st.st_dev, st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns)
    ls = os.lstat(mnt / "l")
    assert stat.S_ISLNK(ls.st_mode)
    assert ls.st_ino != st.st_ino
    assert ls.st_size == 1          # length of the target "f"


def test_lookup_errors(mnt):
    write_file(mnt / "file", b"")
    expect_errno(errno.ENOENT, os.stat, mnt / "missing")
    expect_errno(errno.ENOENT, os.lstat, mnt / "missing")
    expect_errno(errno.ENOENT, os.stat, mnt / "nodir" / "x")
    expect_errno(errno.ENOTDIR, os.stat, mnt / "file" / "x")
    expect_errno(errno.ENOTDIR, os.stat, str(mnt / "file") + "/")
    # a name whose lookup failed can be created at once (no stale negative entry)
    write_file(mnt / "missing", b"now")
    assert os.stat(mnt / "missing").st_size == 3


def test_dot_and_dotdot(mnt):
    os.makedirs(mnt / "a" / "b")
    a, b = os.stat(mnt / "a"), os.stat(mnt / "a" / "b")
    assert os.stat(str(mnt / "a") + "/.").st_ino == a.st_ino  # (pathlib drops ".")
    assert os.stat(mnt / "a" / "b" / "..").st_ino == a.st_ino
    assert os.stat(mnt / "a" / "..").st_ino == os.stat(mnt).st_ino
    assert os.stat(mnt / "a" / "b" / ".." / "b").st_ino == b.st_ino


def test_dir_nlink(mnt):
    n0 = os.stat(mnt).st_nlink
    d = mnt / "d"
    os.mkdir(d)
    assert os.stat(d).st_nlink == 2
    assert os.stat(mnt).st_nlink == n0 + 1
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    write_file(d / "f", b"")
    assert os.stat(d).st_nlink == 4
    assert os.stat(d / "a").st_nlink == 2
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == 3
    os.rename(d / "b", mnt / "b")
    assert os.stat(d).st_nlink == 2
    assert os.stat(mnt).st_nlink == n0 + 2


def test_stat_blocks_of_written_file(mnt):
    f = mnt / "f"
    write_file(f, os.urandom(MiB))
    st = os.stat(f)
    assert st.st_size == MiB
    assert st.st_blocks * 512 >= MiB          # du relies on st_blocks


# --------------------------------------------------------------- times

@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fd"])
def test_utime_ns_roundtrip(mnt, kind):
    p = mnt / "x"
    follow = True
    if kind == "dir":
        os.mkdir(p)
    elif kind == "symlink":
        os.symlink("nowhere", p)
        follow = False
    else:
        write_file(p, b"data")
    values = [
        (1_234_567_890_123_456_789, 1_600_000_000_987_654_321),
        (4_102_444_800_000_000_001, 4_102_444_800_999_999_999),   # year 2100
        (1_000_000_000_000_000_000, 1),                             # 1970 + 1 ns
    ]
    for at, mt in values:
        if kind == "fd":
            fd = os.open(p, os.O_RDONLY)
            try:
                os.utime(fd, ns=(at, mt))
                st = os.fstat(fd)
            finally:
                os.close(fd)
        else:
            os.utime(p, ns=(at, mt), follow_symlinks=follow)
            st = os.lstat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (at, mt)
        st = os.lstat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (at, mt)


def test_utime_now(mnt):
    f = mnt / "f"
    write_file(f, b"x")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    t0 = time.time_ns()
    os.utime(f)                       # utimensat(..., NULL): both set to now
    t1 = time.time_ns()
    st = os.stat(f)
    for t in (st.st_atime_ns, st.st_mtime_ns):
        assert t0 - 10**9 <= t <= t1 + 10**9


def test_utimensat_now_and_omit(mnt):
    f = mnt / "f"
    write_file(f, b"x")
    a0, m0 = 1_500_000_000_111_111_111, 1_500_000_000_222_222_222
    utimensat(f, a0, m0)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a0, m0)
    t0 = time.time_ns()
    utimensat(f, OMIT, NOW)
    st = os.stat(f)
    assert st.st_atime_ns == a0
    assert abs(st.st_mtime_ns - t0) < 2 * 10**9
    m1 = st.st_mtime_ns
    utimensat(f, NOW, OMIT)
    st = os.stat(f)
    assert st.st_mtime_ns == m1
    assert abs(st.st_atime_ns - t0) < 2 * 10**9
    utimensat(f, a0, OMIT)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a0, m1)
    # on a symlink itself
    os.symlink("f", mnt / "l")
    utimensat(mnt / "l", a0, m0, AT_SYMLINK_NOFOLLOW)
    assert os.lstat(mnt / "l").st_mtime_ns == m0
    assert os.stat(f).st_mtime_ns == m1


def test_write_updates_mtime_ctime(mnt):
    f = mnt / "f"
    write_file(f, b"0123456789")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(f).st_ctime_ns
    tick()
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"ab", 3)
        st = os.fstat(fd)
        assert st.st_mtime_ns > OLD_NS and st.st_ctime_ns > c0
    finally:
        os.close(fd)
    st = os.stat(f)
    assert st.st_mtime_ns > OLD_NS and st.st_ctime_ns > c0
    assert read_file(f) == b"012ab56789"


@pytest.mark.parametrize("how", ["truncate", "ftruncate", "open_trunc"])
def test_truncate_updates_mtime_ctime(mnt, how):
    f = mnt / "f"
    write_file(f, b"0123456789")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(f).st_ctime_ns
    tick()
    if how == "truncate":
        os.truncate(f, 4)
    elif how == "ftruncate":
        fd = os.open(f, os.O_WRONLY)
        os.ftruncate(fd, 4)
        os.close(fd)
    else:
        os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    st = os.stat(f)
    assert st.st_size == (0 if how == "open_trunc" else 4)
    assert st.st_mtime_ns > OLD_NS
    assert st.st_ctime_ns > c0


def _ctime_actions():
    def chmod(m):
        os.chmod(m / "f", 0o600)

    def chown(m):
        os.chown(m / "f", os.geteuid(), os.getegid())

    def rename(m):
        os.rename(m / "f", m / "g")
        return m / "g"

    def link(m):
        os.link(m / "f", m / "f2")

    def unlink_other_link(m):
        os.link(m / "f", m / "f2")
        tick()
        before = os.stat(m / "f").st_ctime_ns
        os.unlink(m / "f2")
        return before

    def utime(m):
        os.utime(m / "f", ns=(OLD_NS, OLD_NS))

    return [chmod, chown, rename, link, unlink_other_link, utime]


@pytest.mark.parametrize("action", _ctime_actions(), ids=lambda f: f.__name__)
def test_ctime_changes(mnt, action):
    write_file(mnt / "f", b"x")
    c0 = os.stat(mnt / "f").st_ctime_ns
    tick()
    r = action(mnt)
    if isinstance(r, int):
        c0 = r
        r = None
    st = os.stat(r or mnt / "f")
    assert st.st_ctime_ns > c0


def _parent_actions():
    def create(m):
        write_file(m / "d1" / "new", b"")

    def mkdir(m):
        os.mkdir(m / "d1" / "sub")

    def unlink(m):
        os.unlink(m / "d1" / "f")

    def rmdir(m):
        os.rmdir(m / "d1" / "e")

    def symlink(m):
        os.symlink("f", m / "d1" / "s")

    def link(m):
        os.link(m / "d1" / "f", m / "d1" / "f2")

    def rename_within(m):
        os.rename(m / "d1" / "f", m / "d1" / "g")

    def rename_across(m):
        os.rename(m / "d1" / "f", m / "d2" / "f")

    return [create, mkdir, unlink, rmdir, symlink, link, rename_within, rename_across]


@pytest.mark.parametrize("action", _parent_actions(), ids=lambda f: f.__name__)
def test_parent_dir_mtime_changes(mnt, action):
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    os.mkdir(mnt / "d1" / "e")
    write_file(mnt / "d1" / "f", b"x")
    for d in ("d1", "d2"):
        os.utime(mnt / d, ns=(OLD_NS, OLD_NS))
    c0 = os.stat(mnt / "d1").st_ctime_ns
    tick()
    action(mnt)
    st = os.stat(mnt / "d1")
    assert st.st_mtime_ns > OLD_NS
    assert st.st_ctime_ns > c0
    if action.__name__ == "rename_across":
        assert os.stat(mnt / "d2").st_mtime_ns > OLD_NS
    else:
        assert os.stat(mnt / "d2").st_mtime_ns == OLD_NS


# ------------------------------------------------------------- setattr

def test_chmod_all_bits(mnt):
    f, d = mnt / "f", mnt / "d"
    write_file(f, b"")
    os.mkdir(d)
    for mode in (0o000, 0o644, 0o755, 0o4755, 0o2755, 0o1755, 0o7777, 0o6711, 0o600):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode, oct(mode)
        assert stat.S_ISREG(os.stat(f).st_mode)
    for mode in (0o1777, 0o2775, 0o700, 0o3755, 0o755):
        os.chmod(d, mode)
        assert stat.S_IMODE(os.stat(d).st_mode) == mode, oct(mode)
        assert stat.S_ISDIR(os.stat(d).st_mode)


def test_chmod_via_fd_and_symlink(mnt):
    f = mnt / "f"
    write_file(f, b"")
    os.symlink("f", mnt / "l")
    lmode = os.lstat(mnt / "l").st_mode
    os.chmod(mnt / "l", 0o604)        # follows the link
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o604
    assert os.lstat(mnt / "l").st_mode == lmode
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


@needs_root
def test_chown_as_root(mnt):
    f = mnt / "f"
    write_file(f, b"")
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 42)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.chown(f, 99, -1)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (99, 42)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fchown(fd, 65534, 65534)
        assert os.fstat(fd).st_uid == 65534
    finally:
        os.close(fd)
    os.mkdir(mnt / "d")
    os.chown(mnt / "d", 7, 8)
    assert (os.stat(mnt / "d").st_uid, os.stat(mnt / "d").st_gid) == (7, 8)
    # a symlink itself (lchown); its target keeps its owner
    os.symlink("f", mnt / "l")
    os.chown(mnt / "l", 4321, 8765, follow_symlinks=False)
    assert (os.lstat(mnt / "l").st_uid, os.lstat(mnt / "l").st_gid) == (4321, 8765)
    assert os.stat(f).st_uid == 65534


@needs_root
def test_chown_clears_setuid_setgid(mnt):
    f = mnt / "f"
    write_file(f, b"")
    os.chmod(f, 0o6755)
    os.chown(f, 1234, 1234)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    # a directory keeps its setgid bit on chown
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o2775)
    os.chown(mnt / "d", 1234, 1234)
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o2775


def test_truncate_grow_and_shrink(mnt):
    f = mnt / "f"
    write_file(f, b"abcdefghij")
    os.truncate(f, 5 * MiB + 3)                 # grow across a block boundary
    assert os.stat(f).st_size == 5 * MiB + 3
    data = read_file(f)
    assert data[:10] == b"abcdefghij" and data[10:] == bytes(5 * MiB + 3 - 10)
    os.truncate(f, 3)
    assert read_file(f) == b"abc"
    os.truncate(f, 100)                         # old bytes must not come back
    assert read_file(f) == b"abc" + bytes(97)
    os.truncate(f, 0)
    assert os.stat(f).st_size == 0 and read_file(f) == b""


def test_ftruncate_shrink_then_grow_across_blocks(mnt):
    f = mnt / "f"
    data = os.urandom(6 * MiB)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_all(fd, data)
        os.ftruncate(fd, BLOCK + 100)
        assert os.fstat(fd).st_size == BLOCK + 100
        os.ftruncate(fd, 6 * MiB)
        drop_page_cache(fd)
        got = pread_all(fd, 6 * MiB, 0)
        assert got[:BLOCK + 100] == data[:BLOCK + 100]
        assert got[BLOCK + 100:] == bytes(6 * MiB - BLOCK - 100)
        # a write after a shrink leaves zeros between the old end and it
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"Z", 50)
        drop_page_cache(fd)
        assert pread_all(fd, 100, 0) == data[:10] + bytes(40) + b"Z"
    finally:
        os.close(fd)
    assert read_file(f) == data[:10] + bytes(40) + b"Z"


def test_truncate_sparse_past_chunk(mnt):
    f = mnt / "f"
    write_file(f, b"head")
    os.truncate(f, CHUNK + 1)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == CHUNK + 1
        assert pread_all(fd, 8, 0) == b"head" + bytes(4)
        assert pread_all(fd, 100, CHUNK - 50) == bytes(51)
        assert os.pread(fd, 10, CHUNK + 1) == b""
    finally:
        os.close(fd)


def test_truncate_errors(mnt):
    f = mnt / "f"
    write_file(f, b"abc")
    os.mkdir(mnt / "d")
    expect_errno(errno.EISDIR, os.truncate, mnt / "d", 0)
    expect_errno(errno.ENOENT, os.truncate, mnt / "missing", 0)
    expect_errno(errno.EINVAL, os.truncate, f, -1)
    fd = os.open(f, os.O_RDONLY)
    try:
        expect_errno(errno.EINVAL, os.ftruncate, fd, 0)  # fd not open for writing
    finally:
        os.close(fd)
    assert read_file(f) == b"abc"


def test_posix_fallocate(mnt):
    f = mnt / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        os.posix_fallocate(fd, 0, MiB)
        assert os.fstat(fd).st_size == MiB
        assert pread_all(fd, MiB, 0) == b"abc" + bytes(MiB - 3)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- mknod

def test_mknod_regular(mnt, umask0):
    p = mnt / "reg"
    os.mknod(p, stat.S_IFREG | 0o640)
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 0 and st.st_nlink == 1
    write_file(p, b"data")
    assert read_file(p) == b"data"
    expect_errno(errno.EEXIST, os.mknod, p, stat.S_IFREG | 0o600)


def test_mkfifo(mnt, umask0):
    p = mnt / "fifo"
    os.mkfifo(p, 0o620)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    expect_errno(errno.EEXIST, os.mkfifo, p)
    # it is a real pipe: data written to it comes out of it
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        w = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(w, b"through the pipe")
            assert os.read(r, 100) == b"through the pipe"
        finally:
            os.close(w)
    finally:
        os.close(r)
    assert os.stat(p).st_size == 0


@needs_root
def test_mknod_char_device(mnt, umask0):
    p = mnt / "null"
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(p)
    assert stat.S_ISCHR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert st.st_rdev == os.makedev(1, 3)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    p2 = mnt / "blk"
    os.mknod(p2, stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    st = os.lstat(p2)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(259, 70000)


def test_unix_socket_node(mnt):
    old = os.getcwd()
    os.chdir(mnt)                      # socket paths are limited to 108 bytes
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind("sock")
            assert stat.S_ISSOCK(os.lstat("sock").st_mode)
        finally:
            s.close()
        os.unlink("sock")
    finally:
        os.chdir(old)


# ------------------------------------------------------ mkdir / rmdir

def test_mkdir_modes_and_errors(mnt, umask0):
    os.mkdir(mnt / "a", 0o750)
    assert stat.S_IMODE(os.stat(mnt / "a").st_mode) == 0o750
    os.mkdir(mnt / "s", 0o1777)         # sticky is kept
    assert stat.S_IMODE(os.stat(mnt / "s").st_mode) == 0o1777
    os.umask(0o027)
    os.mkdir(mnt / "b", 0o777)
    assert stat.S_IMODE(os.stat(mnt / "b").st_mode) == 0o750
    write_file(mnt / "f", b"")
    expect_errno(errno.EEXIST, os.mkdir, mnt / "a")
    expect_errno(errno.EEXIST, os.mkdir, mnt / "f")
    expect_errno(errno.ENOENT, os.mkdir, mnt / "missing" / "x")
    expect_errno(errno.ENOTDIR, os.mkdir, mnt / "f" / "x")
    assert os.listdir(mnt / "a") == []


def test_rmdir(mnt):
    os.makedirs(mnt / "d" / "sub")
    write_file(mnt / "f", b"")
    os.symlink("d", mnt / "ld")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    expect_errno(errno.ENOTDIR, os.rmdir, mnt / "f")
    expect_errno(errno.ENOTDIR, os.rmdir, mnt / "ld")
    expect_errno(errno.ENOENT, os.rmdir, mnt / "missing")
    expect_errno(errno.EINVAL, os.rmdir, str(mnt / "d" / "sub") + "/.")  # (pathlib drops ".")
    os.rmdir(mnt / "d" / "sub")
    os.rmdir(mnt / "d")
    expect_errno(errno.ENOENT, os.stat, mnt / "d")
    # a directory that only held files, emptied by unlink, can be removed
    os.mkdir(mnt / "e")
    for i in range(5):
        write_file(mnt / "e" / str(i), b"x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mnt / "e")
    for i in range(5):
        os.unlink(mnt / "e" / str(i))
    os.rmdir(mnt / "e")


def test_unlink(mnt):
    os.mkdir(mnt / "d")
    write_file(mnt / "f", b"")
    expect_errno(errno.EISDIR, os.unlink, mnt / "d")
    expect_errno(errno.ENOENT, os.unlink, mnt / "missing")
    expect_errno(errno.ENOTDIR, os.unlink, mnt / "f" / "x")
    os.symlink("f", mnt / "l")
    os.unlink(mnt / "l")                 # removes the link, not the target
    assert os.path.exists(mnt / "f")
    os.unlink(mnt / "f")
    expect_errno(errno.ENOENT, os.stat, mnt / "f")
    assert sorted(os.listdir(mnt)) == ["d"]


# ---------------------------------------------------------- symlinks

def test_symlink_readlink(mnt):
    write_file(mnt / "target", b"content")
    os.mkdir(mnt / "dir")
    os.symlink("target", mnt / "rel")
    os.symlink(str(mnt / "target"), mnt / "abs")
    os.symlink("../target", mnt / "dir" / "up")
    os.symlink("dir", mnt / "ldir")
    assert os.readlink(mnt / "rel") == "target"
    assert os.readlink(mnt / "abs") == str(mnt / "target")
    for p in ("rel", "abs", "dir/up"):
        assert read_file(mnt / p) == b"content"
    write_file(mnt / "ldir" / "via", b"v")
    assert set(os.listdir(mnt / "ldir")) == {"up", "via"}
    expect_errno(errno.EEXIST, os.symlink, "x", mnt / "rel")
    expect_errno(errno.EINVAL, os.readlink, mnt / "target")
    expect_errno(errno.ENOENT, os.readlink, mnt / "missing")


def test_symlink_dangling_and_loop(mnt):
    os.symlink("nothing-here", mnt / "dangling")
    assert stat.S_ISLNK(os.lstat(mnt / "dangling").st_mode)
    expect_errno(errno.ENOENT, os.stat, mnt / "dangling")
    os.symlink("b", mnt / "a")
    os.symlink("a", mnt / "b")
    expect_errno(errno.ELOOP, os.stat, mnt / "a")
    expect_errno(errno.ELOOP, os.open, mnt / "a", os.O_RDONLY)
    # O_CREAT|O_EXCL never follows a symlink, even a dangling one
    expect_errno(errno.EEXIST, os.open, mnt / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_symlink_long_targets(mnt):
    for n in (1, 255, 256, 1000, 4095):
        target = ("x" * 200 + "/") * (n // 201) + "y" * (n % 201)
        assert len(target) == n
        p = mnt / f"l{n}"
        os.symlink(target, p)
        assert os.readlink(p) == target
        assert os.lstat(p).st_size == n
    expect_errno(errno.ENAMETOOLONG, os.symlink, "z" * 4096, mnt / "toolong")


def test_symlink_binary_target(mnt):
    target = b"\xff\xfe odd \x01 bytes \xe9"
    os.symlink(target, os.fsencode(mnt / "bin"))
    assert os.readlink(os.fsencode(mnt / "bin")) == target


# ------------------------------------------------------------- hard links

def test_link_counts_and_sharing(mnt):
    f = mnt / "f"
    write_file(f, b"one")
    os.mkdir(mnt / "d")
    os.link(f, mnt / "g")
    os.link(f, mnt / "d" / "h")
    ino = os.stat(f).st_ino
    for p in (f, mnt / "g", mnt / "d" / "h"):
        st = os.stat(p)
        assert st.st_ino == ino and st.st_nlink == 3
    write_file(mnt / "g", b"two!")      # O_TRUNC through another name
    assert read_file(f) == b"two!" and read_file(mnt / "d" / "h") == b"two!"
    os.unlink(f)
    assert os.stat(mnt / "g").st_nlink == 2
    os.unlink(mnt / "d" / "h")
    assert os.stat(mnt / "g").st_nlink == 1
    assert read_file(mnt / "g") == b"two!"


def test_link_errors(mnt):
    write_file(mnt / "f", b"")
    write_file(mnt / "g", b"")
    os.mkdir(mnt / "d")
    expect_errno(errno.EEXIST, os.link, mnt / "f", mnt / "g")
    expect_errno(errno.EEXIST, os.link, mnt / "f", mnt / "d")
    expect_errno(errno.EPERM, os.link, mnt / "d", mnt / "d2")
    expect_errno(errno.ENOENT, os.link, mnt / "missing", mnt / "new")
    expect_errno(errno.ENOENT, os.link, mnt / "f", mnt / "nodir" / "new")
    assert os.stat(mnt / "f").st_nlink == 1


def test_link_to_symlink_itself(mnt):
    write_file(mnt / "f", b"")
    os.symlink("f", mnt / "l")
    os.link(mnt / "l", mnt / "l2", follow_symlinks=False)
    a, b = os.lstat(mnt / "l"), os.lstat(mnt / "l2")
    assert stat.S_ISLNK(b.st_mode) and a.st_ino == b.st_ino and b.st_nlink == 2
    assert os.readlink(mnt / "l2") == "f"
    assert os.stat(mnt / "f").st_nlink == 1


# ------------------------------------------------------------------ rename

def test_rename_plain_and_across_dirs(mnt):
    write_file(mnt / "a", b"A")
    ino = os.stat(mnt / "a").st_ino
    os.rename(mnt / "a", mnt / "b")
    expect_errno(errno.ENOENT, os.stat, mnt / "a")
    assert os.stat(mnt / "b").st_ino == ino and read_file(mnt / "b") == b"A"
    os.makedirs(mnt / "x" / "y")
    os.rename(mnt / "b", mnt / "x" / "y" / "c")
    assert os.stat(mnt / "x" / "y" / "c").st_ino == ino
    assert os.listdir(mnt / "x" / "y") == ["c"]
    assert sorted(os.listdir(mnt)) == ["x"]
    # a directory with contents moves with them; its '..' follows
    os.mkdir(mnt / "z")
    os.rename(mnt / "x" / "y", mnt / "z" / "y")
    assert os.stat(mnt / "z" / "y" / "..").st_ino == os.stat(mnt / "z").st_ino
    assert read_file(mnt / "z" / "y" / "c") == b"A"
    assert os.stat(mnt / "x").st_nlink == 2 and os.stat(mnt / "z").st_nlink == 3


def test_rename_over_existing_file(mnt):
    write_file(mnt / "src", b"new")
    write_file(mnt / "dst", b"old contents")
    src_ino = os.stat(mnt / "src").st_ino
    fd = os.open(mnt / "dst", os.O_RDONLY)
    try:
        os.rename(mnt / "src", mnt / "dst")
        st = os.fstat(fd)
        assert st.st_nlink == 0                      # the old inode is gone
        assert os.pread(fd, 100, 0) == b"old contents"  # but still readable
    finally:
        os.close(fd)
    assert os.stat(mnt / "dst").st_ino == src_ino
    assert read_file(mnt / "dst") == b"new"
    assert os.listdir(mnt) == ["dst"]


def test_rename_over_file_with_other_links(mnt):
    write_file(mnt / "src", b"new")
    write_file(mnt / "dst", b"old")
    os.link(mnt / "dst", mnt / "keep")
    os.rename(mnt / "src", mnt / "dst")
    assert read_file(mnt / "keep") == b"old"
    assert os.stat(mnt / "keep").st_nlink == 1


def test_rename_dir_over_empty_dir(mnt):
    os.makedirs(mnt / "a" / "inner")
    os.mkdir(mnt / "b")
    n0 = os.stat(mnt).st_nlink
    a_ino = os.stat(mnt / "a").st_ino
    os.rename(mnt / "a", mnt / "b")
    assert os.stat(mnt / "b").st_ino == a_ino
    assert os.listdir(mnt / "b") == ["inner"]
    assert sorted(os.listdir(mnt)) == ["b"]
    assert os.stat(mnt).st_nlink == n0 - 1


def test_rename_errors(mnt):
    os.makedirs(mnt / "full" / "x")
    os.makedirs(mnt / "d" / "sub")
    os.mkdir(mnt / "empty")
    write_file(mnt / "f", b"f")
    expect_errno(errno.ENOTEMPTY, os.rename, mnt / "d", mnt / "full")
    expect_errno(errno.EISDIR, os.rename, mnt / "f", mnt / "empty")
    expect_errno(errno.ENOTDIR, os.rename, mnt / "empty", mnt / "f")
    expect_errno(errno.EINVAL, os.rename, mnt / "d", mnt / "d" / "sub" / "new")
    expect_errno(errno.EINVAL, os.rename, mnt / "d", mnt / "d" / "new")
    expect_errno(errno.ENOENT, os.rename, mnt / "missing", mnt / "new")
    expect_errno(errno.ENOENT, os.rename, mnt / "f", mnt / "nodir" / "new")
    expect_errno(errno.ENOTDIR, os.rename, mnt / "f", mnt / "f" / "new")
    # nothing moved
    assert sorted(os.listdir(mnt)) == ["d", "empty", "f", "full"]
    assert os.listdir(mnt / "d") == ["sub"] and os.listdir(mnt / "full") == ["x"]
    assert read_file(mnt / "f") == b"f"


def test_rename_to_itself_is_noop(mnt):
    write_file(mnt / "f", b"same")
    os.mkdir(mnt / "d")
    st = os.stat(mnt / "f")
    os.rename(mnt / "f", mnt / "f")
    os.rename(mnt / "d", mnt / "d")
    assert os.stat(mnt / "f").st_ino == st.st_ino and read_file(mnt / "f") == b"same"
    # two names of one inode: rename(a, b) does nothing, both names stay
    os.link(mnt / "f", mnt / "h")
    os.rename(mnt / "f", mnt / "h")
    assert sorted(os.listdir(mnt)) == ["d", "f", "h"]
    assert os.stat(mnt / "h").st_nlink == 2


def test_rename_open_file_keeps_working(mnt):
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        os.mkdir(mnt / "d")
        os.rename(mnt / "f", mnt / "d" / "g")
        os.write(fd, b"after")
        os.fsync(fd)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert read_file(mnt / "d" / "g") == b"before after"


def test_rename_noreplace(mnt):
    write_file(mnt / "a", b"A")
    write_file(mnt / "b", b"B")
    expect_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert read_file(mnt / "a") == b"A" and read_file(mnt / "b") == b"B"
    os.mkdir(mnt / "d")
    expect_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "d", RENAME_NOREPLACE)
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert read_file(mnt / "c") == b"A"
    assert sorted(os.listdir(mnt)) == ["b", "c", "d"]


def test_rename_exchange_files(mnt):
    write_file(mnt / "a", b"AAAA")
    write_file(mnt / "b", b"bb")
    ia, ib = os.stat(mnt / "a").st_ino, os.stat(mnt / "b").st_ino
    renameat2(mnt / "a", mnt / "b", RENAME_EXCHANGE)
    assert read_file(mnt / "a") == b"bb" and read_file(mnt / "b") == b"AAAA"
    assert os.stat(mnt / "a").st_ino == ib and os.stat(mnt / "b").st_ino == ia
    expect_errno(errno.ENOENT, renameat2, mnt / "a", mnt / "missing", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, mnt / "a", mnt / "b",
                 RENAME_EXCHANGE | RENAME_NOREPLACE)


def test_rename_exchange_dirs_across_parents(mnt):
    os.makedirs(mnt / "p1" / "x" / "x1")
    os.makedirs(mnt / "p2" / "y")
    write_file(mnt / "p1" / "x" / "fx", b"x")
    write_file(mnt / "p2" / "y" / "fy", b"y")
    n1, n2 = os.stat(mnt / "p1").st_nlink, os.stat(mnt / "p2").st_nlink
    renameat2(mnt / "p1" / "x", mnt / "p2" / "y", RENAME_EXCHANGE)
    assert sorted(os.listdir(mnt / "p1" / "x")) == ["fy"]
    assert sorted(os.listdir(mnt / "p2" / "y")) == ["fx", "x1"]
    assert os.stat(mnt / "p1").st_nlink == n1 and os.stat(mnt / "p2").st_nlink == n2
    assert os.stat(mnt / "p1" / "x" / "..").st_ino == os.stat(mnt / "p1").st_ino
    assert os.stat(mnt / "p2" / "y" / "..").st_ino == os.stat(mnt / "p2").st_ino
    assert os.stat(mnt / "p2" / "y").st_nlink == 3
    # a file and a directory across parents: parents' link counts move
    write_file(mnt / "p1" / "file", b"F")
    renameat2(mnt / "p1" / "file", mnt / "p2" / "y", RENAME_EXCHANGE)
    assert os.stat(mnt / "p1").st_nlink == n1 + 1
    assert os.stat(mnt / "p2").st_nlink == n2 - 1
    assert read_file(mnt / "p2" / "y") == b"F"
    assert sorted(os.listdir(mnt / "p1" / "file")) == ["fx", "x1"]
    assert os.stat(mnt / "p1" / "file" / "..").st_ino == os.stat(mnt / "p1").st_ino


# ------------------------------------------------------------ open / create

def test_open_creat_excl(mnt):
    p = mnt / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"first")
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.mkdir(mnt / "d")
    expect_errno(errno.EEXIST, os.open, mnt / "d", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    # O_CREAT alone opens the existing file and keeps its data
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.read(fd, 100) == b"first"
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_open_trunc(mnt):
    p = mnt / "f"
    write_file(p, b"x" * 10000)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"short")
    finally:
        os.close(fd)
    assert read_file(p) == b"short"


def test_open_append_two_fds(mnt):
    p = mnt / "f"
    write_file(p, b"start:")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"A1,")
        os.write(b, b"B1,")
        os.write(a, b"A2,")
        os.lseek(b, 0, os.SEEK_SET)       # O_APPEND ignores the position
        os.write(b, b"B2,")
    finally:
        os.close(a)
        os.close(b)
    assert read_file(p) == b"start:A1,B1,A2,B2,"


APPENDER = r"""
import os, sys
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for i in range(n):
    rec = (tag + "%06d" % i).ljust(63).encode() + b"\n"
    assert os.write(fd, rec) == 64
os.close(fd)
"""


def test_open_append_concurrent_processes(mnt):
    p = mnt / "log"
    write_file(p, b"")
    n = 300
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(p), tag, str(n)])
             for tag in ("alpha", "beta")]
    for pr in procs:
        assert pr.wait(60) == 0
    data = read_file(p)
    assert len(data) == 2 * n * 64
    recs = [data[i:i + 64] for i in range(0, len(data), 64)]
    expect = {(t + "%06d" % i).ljust(63).encode() + b"\n"
              for t in ("alpha", "beta") for i in range(n)}
    assert set(recs) == expect and len(recs) == len(expect)
    # each writer's records are in its own order
    for t in (b"alpha", b"beta"):
        mine = [r for r in recs if r.startswith(t)]
        assert mine == sorted(mine)


def test_open_errors(mnt):
    write_file(mnt / "f", b"data")
    os.mkdir(mnt / "d")
    expect_errno(errno.ENOENT, os.open, mnt / "missing", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.open, mnt / "nodir" / "f", os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOTDIR, os.open, mnt / "f" / "x", os.O_RDONLY)
    expect_errno(errno.ENOTDIR, os.open, mnt / "f" / "x", os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOTDIR, os.open, mnt / "f", os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.EISDIR, os.open, mnt / "d", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, mnt / "d", os.O_RDWR)
    os.symlink("f", mnt / "l")
    expect_errno(errno.ELOOP, os.open, mnt / "l", os.O_RDONLY | os.O_NOFOLLOW)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        expect_errno(errno.EBADF, os.write, fd, b"x")
    finally:
        os.close(fd)
    fd = os.open(mnt / "f", os.O_WRONLY)
    try:
        expect_errno(errno.EBADF, os.read, fd, 1)
    finally:
        os.close(fd)
    fd = os.open(mnt / "d", os.O_RDONLY)
    try:
        expect_errno(errno.EISDIR, os.read, fd, 1)
    finally:
        os.close(fd)
    assert read_file(mnt / "f") == b"data"


def test_name_length_limits(mnt):
    n255 = "a" * 255
    fd = os.open(mnt / n255, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    assert n255 in os.listdir(mnt)
    assert os.stat(mnt / n255).st_size == 0
    multibyte = "é" * 127 + "a"                     # 255 bytes in UTF-8
    assert len(multibyte.encode()) == 255
    os.mkdir(mnt / multibyte)
    assert multibyte in os.listdir(mnt)
    n256 = "b" * 256
    expect_errno(errno.ENAMETOOLONG, os.open, mnt / n256, os.O_WRONLY | os.O_CREAT, 0o644)
    expect_errno(errno.ENAMETOOLONG, os.stat, mnt / n256)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt / n256)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "x", mnt / n256)
    expect_errno(errno.ENAMETOOLONG, os.rename, mnt / n255, mnt / n256)
    expect_errno(errno.ENAMETOOLONG, os.link, mnt / n255, mnt / n256)
    assert sorted(os.listdir(mnt)) == sorted([n255, multibyte])


def test_odd_names(mnt):
    names = [b"with space", b"tab\there", b"new\nline", b"-dash", b"...", b"\xff\xfe",
             "ünïcödé ✓".encode(), b"a" * 200, b"UPPER", b"upper", b"#%&*?[]{}"]
    for n in names:
        write_file(os.path.join(os.fsencode(mnt), n), n)
    assert sorted(os.listdir(os.fsencode(mnt))) == sorted(names)
    for n in names:
        assert read_file(os.path.join(os.fsencode(mnt), n)) == n


# --------------------------------------------------------------- read/write

def test_pread_pwrite_offsets(mnt):
    p = mnt / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"hello", 0) == 5
        assert os.pwrite(fd, b"world", 100) == 5          # leaves a hole
        assert os.fstat(fd).st_size == 105
        assert os.pread(fd, 5, 0) == b"hello"
        assert os.pread(fd, 95, 5) == bytes(95)
        assert os.pread(fd, 10, 100) == b"world"
        assert os.pread(fd, 10, 105) == b""               # at EOF
        assert os.pread(fd, 10, 10**9) == b""             # far past EOF
        assert os.pread(fd, 1000, 50) == bytes(50) + b"world"   # short read at EOF
        os.pwrite(fd, b"XY", 3)                           # overwrite in place
        os.pwrite(fd, b"1234567", 98)                     # overlaps the end
        drop_page_cache(fd)
        assert pread_all(fd, 200, 0) == b"helXY" + bytes(93) + b"1234567"
        # the file position is untouched by pread/pwrite
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert os.read(fd, 3) == b"hel"
    finally:
        os.close(fd)


def test_many_small_writes_then_read(mnt):
    p = mnt / "f"
    parts = [os.urandom(1 + (i * 7919) % 5000) for i in range(200)]
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for part in parts:
            write_all(fd, part)
    finally:
        os.close(fd)
    assert read_file(p) == b"".join(parts)


def test_large_write_across_block_boundaries(mnt):
    p = mnt / "big"
    data = os.urandom(9 * MiB + 12345)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_all(fd, data)
        assert os.fstat(fd).st_size == len(data)
        # overwrite a span straddling the 4 MiB and 8 MiB block boundaries
        patch = os.urandom(4 * MiB + 20)
        write_all(fd, patch, offset=BLOCK - 10)
        data = data[:BLOCK - 10] + patch + data[BLOCK - 10 + len(patch):]
        drop_page_cache(fd)
        for off, n in [(0, 100), (BLOCK - 50, 100), (2 * BLOCK - 7, 30),
                       (len(data) - 10, 100), (123456, 3 * MiB)]:
            assert pread_all(fd, n, off) == data[off:off + n], (off, n)
    finally:
        os.close(fd)
    assert read_file(p) == data


def test_sparse_write_across_chunk_boundary(mnt):
    p = mnt / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        tail = b"<-- chunk edge -->"
        off = CHUNK - 7
        write_all(fd, tail, offset=off)
        write_all(fd, b"head", offset=0)
        assert os.fstat(fd).st_size == off + len(tail)
        drop_page_cache(fd)
        assert pread_all(fd, 100, off - 50) == bytes(50) + tail
        assert pread_all(fd, len(tail), off) == tail
        assert pread_all(fd, 11, CHUNK) == tail[7:]
        assert pread_all(fd, 8, 0) == b"head" + bytes(4)
        assert pread_all(fd, MiB, 32 * MiB) == bytes(MiB)
        assert pread_all(fd, 20, BLOCK - 10) == bytes(20)
        assert os.pread(fd, 10, off + len(tail)) == b""
    finally:
        os.close(fd)


def test_read_while_being_written(mnt):
    p = mnt / "f"
    w = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(w, b"first part;")
        r = os.open(p, os.O_RDONLY)
        try:
            assert os.read(r, 100) == b"first part;"
            os.write(w, b"second part")
            assert os.pread(r, 100, 0) == b"first part;second part"
            assert os.fstat(r).st_size == 22
            chunk = os.urandom(2 * MiB)
            write_all(w, chunk)
            assert pread_all(r, 2 * MiB, 22) == chunk
            # and through a third, fresh open as well
            assert read_file(p) == b"first part;second part" + chunk
        finally:
            os.close(r)
    finally:
        os.close(w)


def test_sync_calls_and_close(mnt):
    p = mnt / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 5000)
    os.fsync(fd)
    os.write(fd, b"y" * 5000)
    os.fdatasync(fd)
    os.close(fd)
    assert read_file(p) == b"x" * 5000 + b"y" * 5000
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    with open(p, "ab") as f:        # flush() + close() through the C library
        f.write(b"z")
        f.flush()
    assert os.stat(p).st_size == 10001
    os.sync()


def test_mmap_shared_write_and_read(mnt):
    p = mnt / "f"
    write_file(p, b"\0" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 8192)
        mm[100:105] = b"hello"
        mm[5000:5005] = b"world"
        mm.flush()
        mm.close()
    finally:
        os.close(fd)
    data = read_file(p)
    assert data[100:105] == b"hello" and data[5000:5005] == b"world"
    assert len(data) == 8192
    fd = os.open(p, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        assert mm[100:105] == b"hello"
        mm.close()
    finally:
        os.close(fd)


def test_copy_file_range_and_copyfile(mnt):
    src = mnt / "src"
    data = os.urandom(3 * MiB + 5)
    write_file(src, data)
    shutil.copyfile(src, mnt / "copy1")
    assert read_file(mnt / "copy1") == data
    a = os.open(src, os.O_RDONLY)
    b = os.open(mnt / "copy2", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < len(data):
            n = os.copy_file_range(a, b, len(data) - done)
            assert n > 0
            done += n
    finally:
        os.close(a)
        os.close(b)
    assert read_file(mnt / "copy2") == data


# ---------------------------------------------------------------- readdir

def test_readdir_dot_dotdot_and_types(mnt):
    os.mkdir(mnt / "dir")
    write_file(mnt / "file", b"")
    os.symlink("file", mnt / "link")
    os.mkfifo(mnt / "fifo")
    ents = raw_readdir(mnt)
    names = [e[0] for e in ents]
    assert sorted(names) == sorted([b".", b"..", b"dir", b"file", b"link", b"fifo"])
    by = {e[0]: e for e in ents}
    assert by[b"."][2] == DT_DIR and by[b".."][2] == DT_DIR
    expect_types = {b"dir": DT_DIR, b"file": DT_REG, b"link": DT_LNK, b"fifo": DT_FIFO}
    for n, t in expect_types.items():
        assert by[n][2] == t, n
        assert by[n][1] == os.lstat(os.path.join(os.fsencode(mnt), n)).st_ino, n
    assert [e[0] for e in raw_readdir(mnt / "dir")] in ([b".", b".."], [b"..", b"."])
    with os.scandir(mnt) as it:
        got = {e.name: e for e in it}
    assert set(got) == {"dir", "file", "link", "fifo"}
    assert got["dir"].is_dir(follow_symlinks=False)
    assert got["file"].is_file(follow_symlinks=False)
    assert got["link"].is_symlink() and got["link"].is_file()
    assert stat.S_ISFIFO(got["fifo"].stat(follow_symlinks=False).st_mode)
    for n, e in got.items():
        assert e.inode() == os.lstat(mnt / n).st_ino


def test_readdir_large_directory(mnt):
    d = mnt / "big"
    os.mkdir(d)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(3000)]
    for n in names:
        os.mknod(d / n)
    listed = os.listdir(d)
    assert len(listed) == len(names)
    assert set(listed) == set(names)
    with os.scandir(d) as it:
        scanned = [e.name for e in it]
    assert sorted(scanned) == sorted(names)
    raw = [e[0] for e in raw_readdir(d)]
    assert len(raw) == len(names) + 2


def test_readdir_with_concurrent_changes(mnt):
    d = mnt / "live"
    os.mkdir(d)
    pad = "p" * 90                      # long names: the listing takes many getdents calls
    initial = [f"{i:05d}{pad}" for i in range(1000)]
    for n in initial:
        os.mknod(d / n)
    it = os.scandir(d)
    try:
        first = [next(it).name for _ in range(300)]
        seen = set(first)
        # delete 50 already returned and 50 not yet returned, add 100 new
        deleted = [n for n in initial if n in seen][:50] + \
                  [n for n in initial if n not in seen][:50]
        for n in deleted:
            os.unlink(d / n)
        added = [f"new{i:05d}{pad}" for i in range(100)]
        for n in added:
            os.mknod(d / n)
        rest = [e.name for e in it]
    finally:
        it.close()
    allnames = first + rest
    dupes = {n for n in allnames if allnames.count(n) > 1}
    assert not dupes, f"returned twice: {sorted(dupes)[:5]}"
    stable = set(initial) - set(deleted)
    missing = stable - set(allnames)
    assert not missing, f"never returned: {sorted(missing)[:5]}"
    assert set(allnames) <= set(initial) | set(added)
    assert set(os.listdir(d)) == stable | set(added)


def test_readdir_empty_and_after_removal(mnt):
    assert os.listdir(mnt) == []
    write_file(mnt / "a", b"")
    os.mkdir(mnt / "b")
    assert sorted(os.listdir(mnt)) == ["a", "b"]
    os.unlink(mnt / "a")
    os.rmdir(mnt / "b")
    assert os.listdir(mnt) == []
    expect_errno(errno.ENOTDIR, os.listdir, _mk(mnt / "f"))
    expect_errno(errno.ENOENT, os.listdir, mnt / "missing")


def _mk(p):
    write_file(p, b"")
    return p


# ----------------------------------------------------------------- statfs

def test_statvfs(mnt):
    s = os.statvfs(mnt)
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert s.f_blocks > 0
    assert s.f_blocks >= s.f_bfree >= s.f_bavail >= 0
    assert s.f_files > 0 and s.f_files >= s.f_ffree
    assert s.f_namemax == 255
    write_file(mnt / "f", b"x")
    s2 = os.statvfs(mnt / "f")
    assert s2.f_bsize == s.f_bsize and s2.f_namemax == 255


# ----------------------------------------------------------------- xattrs

@pytest.mark.parametrize("kind", ["file", "dir"])
def test_xattr_basic(mnt, kind):
    p = mnt / "x"
    if kind == "dir":
        os.mkdir(p)
    else:
        write_file(p, b"data")
    assert [n for n in os.listxattr(p) if n.startswith("user.")] == []
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.two", b"\x00binary\xff")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.two") == b"\x00binary\xff"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(n for n in os.listxattr(p) if n.startswith("user.")) == \
        ["user.empty", "user.one", "user.two"]
    os.setxattr(p, "user.one", b"replaced, longer value")
    assert os.getxattr(p, "user.one") == b"replaced, longer value"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.one", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.nope", b"x", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, p, "user.nope")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.nope")
    os.setxattr(p, "user.one", b"r", os.XATTR_REPLACE)
    os.setxattr(p, "user.three", b"3", os.XATTR_CREATE)
    assert os.getxattr(p, "user.one") == b"r"
    os.removexattr(p, "user.one")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.one")
    assert sorted(n for n in os.listxattr(p) if n.startswith("user.")) == \
        ["user.empty", "user.three", "user.two"]
    # through an fd too
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.getxattr(fd, "user.three") == b"3"
        os.setxattr(fd, "user.fd", b"via fd")
    finally:
        os.close(fd)
    assert os.getxattr(p, "user.fd") == b"via fd"


def test_xattr_large_value(mnt):
    p = mnt / "f"
    write_file(p, b"")
    value = os.urandom(64 * KiB)
    try:
        os.setxattr(p, "user.big", value)
    except OSError as e:
        if ON_KERNEL_FS and e.errno in (errno.ENOSPC, errno.E2BIG):
            pytest.skip("this kernel filesystem limits xattr values (ext4 without ea_inode)")
        raise
    assert os.getxattr(p, "user.big") == value
    assert "user.big" in os.listxattr(p)
    expect_errno(errno.E2BIG, os.setxattr, p, "user.toobig", bytes(64 * KiB + 1))


def test_xattr_limits_and_symlink(mnt):
    p = mnt / "f"
    write_file(p, b"")
    expect_errno(errno.ERANGE, os.setxattr, p, "user." + "n" * 251, b"x")
    os.setxattr(p, "user." + "n" * 250, b"x")          # 255-byte name is fine
    assert os.getxattr(p, "user." + "n" * 250) == b"x"
    expect_errno(errno.ENOENT, os.getxattr, mnt / "missing", "user.x")
    # user.* attributes exist only on files and directories
    os.symlink("f", mnt / "l")
    expect_errno(errno.EPERM, os.setxattr, mnt / "l", "user.x", b"1", follow_symlinks=False)
    os.setxattr(mnt / "l", "user.viaLink", b"1")          # follows to f
    assert os.getxattr(p, "user.viaLink") == b"1"


def test_xattr_survives_rename_and_link(mnt):
    write_file(mnt / "f", b"")
    os.setxattr(mnt / "f", "user.k", b"v")
    os.rename(mnt / "f", mnt / "g")
    os.link(mnt / "g", mnt / "h")
    assert os.getxattr(mnt / "g", "user.k") == b"v"
    assert os.getxattr(mnt / "h", "user.k") == b"v"


# ----------------------------------------------------------------- access

@needs_root
def test_access_as_root(mnt):
    f = mnt / "f"
    write_file(f, b"")
    os.chmod(f, 0o000)
    assert os.access(f, os.R_OK | os.W_OK)
    assert not os.access(f, os.X_OK)            # root needs some x bit
    os.chmod(f, 0o100)
    assert os.access(f, os.X_OK)
    os.chmod(f, 0o001)
    assert os.access(f, os.R_OK | os.W_OK | os.X_OK)
    os.mkdir(mnt / "d", 0o000)
    try:
        assert os.access(mnt / "d", os.R_OK | os.W_OK | os.X_OK)
    finally:
        os.chmod(mnt / "d", 0o755)
    assert os.access(f, os.F_OK)
    assert not os.access(mnt / "missing", os.F_OK)


# ------------------------------------------------------------------ locks

FLOCK_CHILD = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
op = {"ex": fcntl.LOCK_EX, "sh": fcntl.LOCK_SH}[sys.argv[2]]
try:
    fcntl.flock(fd, op | fcntl.LOCK_NB)
    print("ok")
except OSError as e:
    print(e.errno)
"""


def test_flock_between_processes(mnt):
    p = mnt / "lock"
    write_file(p, b"")
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_py(FLOCK_CHILD, p, "ex") == str(errno.EWOULDBLOCK)
        assert run_py(FLOCK_CHILD, p, "sh") == str(errno.EWOULDBLOCK)
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert run_py(FLOCK_CHILD, p, "ex") == "ok"
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert run_py(FLOCK_CHILD, p, "sh") == "ok"
        assert run_py(FLOCK_CHILD, p, "ex") == str(errno.EWOULDBLOCK)
        # a second open file description in this process conflicts too
        fd2 = os.open(p, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
    assert run_py(FLOCK_CHILD, p, "ex") == "ok"     # closing released it


POSIX_LOCK_CHILD = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
out = []
for spec in sys.argv[2:]:
    kind, start, length = spec.split(":")
    start, length = int(start), int(length)
    if kind == "getlk":
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        t, w, s, l, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, req))
        out.append("unlck" if t == fcntl.F_UNLCK else "%d,%d,%d,%d" % (t, s, l, pid))
        continue
    op = fcntl.LOCK_EX if kind == "ex" else fcntl.LOCK_SH
    try:
        fcntl.lockf(fd, op | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        out.append("ok")
    except OSError as e:
        out.append("busy" if e.errno in (11, 13) else str(e.errno))
print(" ".join(out))
"""


def test_posix_byte_range_locks_between_processes(mnt):
    p = mnt / "lock"
    write_file(p, b"x" * 1000)
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0, os.SEEK_SET)   # bytes 0-99
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 100, 500, os.SEEK_SET)  # bytes 500-599
        out = run_py(POSIX_LOCK_CHILD, p, "ex:50:10", "sh:99:1", "ex:100:100",
                     "sh:550:10", "ex:550:10", "getlk:0:10", "getlk:200:10").split()
        assert out[:5] == ["busy", "busy", "ok", "ok", "busy"], out
        assert out[5] == f"{fcntl.F_WRLCK},0,100,{os.getpid()}", out
        assert out[6] == "unlck", out
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0, os.SEEK_SET)
        assert run_py(POSIX_LOCK_CHILD, p, "ex:0:100", "ex:550:10").split() == ["ok", "busy"]
    finally:
        os.close(fd)
    assert run_py(POSIX_LOCK_CHILD, p, "ex:0:0").split() == ["ok"]


# ----------------------------------------------------- unlinked but open

def test_unlinked_open_file(mnt):
    p = mnt / "f"
    data = os.urandom(256 * KiB)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
        os.unlink(p)
        expect_errno(errno.ENOENT, os.stat, p)
        assert os.listdir(mnt) == []
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == len(data)
        drop_page_cache(fd)
        assert pread_all(fd, len(data), 0) == data
        write_all(fd, b"more", offset=len(data))
        os.fsync(fd)
        assert os.fstat(fd).st_size == len(data) + 4
        drop_page_cache(fd)
        assert pread_all(fd, 10, len(data) - 6) == data[-6:] + b"more"
        # the name can be reused at once for an unrelated file
        write_file(p, b"new file")
        assert read_file(p) == b"new file"
        assert os.stat(p).st_ino != st.st_ino
        assert pread_all(fd, 4, len(data)) == b"more"
    finally:
        os.close(fd)
    assert read_file(p) == b"new file"


def _used_bytes(path):
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def _poll(cond, deadline_s=15.0):
    end = time.monotonic() + deadline_s
    while True:
        v = cond()
        if v or time.monotonic() > end:
            return v
        time.sleep(0.2)


def test_unlinked_file_space_freed_after_close(mnt):
    """Space of an unlinked file is released once its last fd closes. This
    compares statvfs before/after, so it assumes nothing else writes tens
    of MiB to the same filesystem in the meantime (true of a test mount;
    on a shared kernel fs it can be disturbed by other writers)."""
    size = 32 * MiB
    margin = 16 * MiB
    p = mnt / "f"
    u0 = _used_bytes(mnt)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        chunk = os.urandom(MiB)
        for i in range(size // MiB):
            write_all(fd, chunk)
        os.fsync(fd)
        assert _poll(lambda: _used_bytes(mnt) >= u0 + margin), "usage did not grow"
        u1 = _used_bytes(mnt)
        os.unlink(p)
        assert pread_all(fd, 10, 0) == chunk[:10]
    finally:
        os.close(fd)
    assert _poll(lambda: _used_bytes(mnt) <= u1 - margin), \
        f"space not freed: before close {u1}, now {_used_bytes(mnt)}"
