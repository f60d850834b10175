"""A minimal pyfuse3 filesystem: the ceiling of any pyfuse3 daemon here.

It holds two read-only files of ``--size-mib`` MiB, ``data`` (page-cached,
opened without keep_cache so every open starts cold) and ``data_direct``
(opened with direct_io). read() returns a slice of one preallocated buffer, so
what a reader measures is FUSE + pyfuse3 + trio overhead, nothing else.

    python -m bench.nullfs MOUNTPOINT [--size-mib 1024]

Runs in the foreground; SIGTERM/SIGINT or an external umount stops it.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat

import pyfuse3
import trio

BUF_SIZE = 4 * 1024 * 1024  # the buffer that reads slice from (wraps around)

FILES = {
    b"data": (pyfuse3.ROOT_INODE + 1, False),
    b"data_direct": (pyfuse3.ROOT_INODE + 2, True),
}
INODES = {ino: (name, direct) for name, (ino, direct) in FILES.items()}


class NullFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        # 2x so that any read of up to BUF_SIZE starting anywhere in the
        # first BUF_SIZE bytes is one contiguous slice.
        self.buf = memoryview(bytes(range(256)) * (2 * BUF_SIZE // 256))

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 300
        a.attr_timeout = 300
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif ino in INODES:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_uid = 0
        a.st_gid = 0
        a.st_blksize = 1 << 20
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILES[name][0])

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(FILES.items(), key=lambda kv: kv[1][0])
        for name, (ino, _direct) in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), ino):
                break

    async def open(self, inode, flags, ctx):
        if inode not in INODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        direct = INODES[inode][1]
        return pyfuse3.FileInfo(fh=inode, direct_io=direct, keep_cache=False)

    async def read(self, fh, off, size):
        if off >= self.size:
            return b""
        size = min(size, self.size - off, BUF_SIZE)
        start = off % BUF_SIZE
        return self.buf[start:start + size]

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = 2 * self.size // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    ops = NullFS(args.size_mib * 1024 * 1024)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=bench-nullfs")
    opts.add("ro")
    pyfuse3.init(ops, args.mountpoint, opts)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
