"""pyfuse3 operations: translate FUSE requests to VFS calls, nothing more.

VFS methods raise OSError; every handler turns that into FUSEError with the
same errno. Attributes become EntryAttributes with the configured timeouts.
Each handler's duration goes to jfscache_fuse_op_duration_seconds{op}.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pyfuse3

log = logging.getLogger("jfscache.fuse")
_CACHE_READDIR = hasattr(pyfuse3.FileInfo(), "cache_readdir")
_NOFLUSH = hasattr(pyfuse3.FileInfo(), "noflush")
_PLAIN_READDIR = hasattr(pyfuse3.ReaddirToken, "plus")

TYPE_CHAR = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
             stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s"}


def _errors(fn):
    """OSError → FUSEError; anything unexpected is logged and becomes EIO.
    The operation is timed, failed or not."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.metrics.fuse_op(op, time.perf_counter() - t)
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # The patched pyfuse3: the kernel asks for attributes only where it
    # expects lookups (`ls -l`, not `ls` or a program's listdir).
    enable_readdirplus_auto = True

    def __init__(self, vfs):
        super().__init__()
        self.vfs = vfs
        self.metrics = vfs.metrics
        # --subdir: the mount's root is this directory's inode. The kernel
        # knows it as pyfuse3.ROOT_INODE, in both directions, and '..' of it
        # is itself, so nothing above it can be reached.
        self.root = vfs.root
        self.attr_timeout = vfs.opts.attr_timeout
        self.xattrs = vfs.opts.xattrs
        self.entry_timeout = vfs.opts.entry_timeout

    def _entry(self, a) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.ROOT_INODE if a.ino == self.root else a.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.st_mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.length
        # For a directory, st_blksize sizes glibc's readdir buffer (32 KiB to
        # 1 MiB), and so the kernel's requests: at 1 MiB, the first request
        # of a listing, which is always READDIRPLUS, fetched the attributes
        # of ~6,500 entries, also for an `ls` that never uses them.
        e.st_blksize = 4096 if a.type == "d" else 1 << 20
        e.st_blocks = (a.length + 511) // 512
        e.st_atime_ns = a.atime
        e.st_mtime_ns = a.mtime
        e.st_ctime_ns = a.ctime
        return e

    def _in(self, inode: int) -> int:
        return self.root if inode == pyfuse3.ROOT_INODE else inode

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent_inode = self._in(parent_inode)
        if name == b".":
            return self._entry(await self.vfs.getattr(parent_inode))
        if name == b"..":
            a = await self.vfs.getattr(parent_inode)
            up = parent_inode if parent_inode == self.root else (a.parent or self.root)
            return self._entry(await self.vfs.getattr(up))
        return self._entry(await self.vfs.lookup(parent_inode, name))

    @_errors
    async def getattr(self, inode, ctx=None):
        inode = self._in(inode)
        return self._entry(await self.vfs.getattr(inode))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        inode = self._in(inode)
        kw = {}
        if fields.update_mode:
            kw["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns
        if fields.update_size:
            kw["size"] = attr.st_size
        return self._entry(await self.vfs.setattr(inode, **kw))

    @_errors
    async def readlink(self, inode, ctx):
        inode = self._in(inode)
        return await self.vfs.readlink(inode)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent_inode = self._in(parent_inode)
        typ = TYPE_CHAR.get(stat.S_IFMT(mode))
        if typ is None or typ in "dl":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._entry(await self.vfs.mknod(parent_inode, name, typ, mode, ctx.uid, ctx.gid, rdev))

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent_inode = self._in(parent_inode)
        return self._entry(await self.vfs.mknod(parent_inode, name, "d", mode, ctx.uid, ctx.gid))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent_inode = self._in(parent_inode)
        return self._entry(await self.vfs.mknod(parent_inode, name, "l", 0o777, ctx.uid, ctx.gid, target=target))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        parent_inode = self._in(parent_inode)
        await self.vfs.unlink(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent_inode = self._in(parent_inode)
        await self.vfs.rmdir(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        parent_inode_old, parent_inode_new = self._in(parent_inode_old), self._in(parent_inode_new)
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        inode, new_parent_inode = self._in(inode), self._in(new_parent_inode)
        return self._entry(await self.vfs.link(inode, new_parent_inode, new_name))

    @_errors
    async def open(self, inode, flags, ctx):
        inode = self._in(inode)
        fh, keep, direct = await self.vfs.open(inode, flags)
        fi = pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)
        if _NOFLUSH and flags & os.O_ACCMODE == os.O_RDONLY:
            # flush() commits this node's pending writes to the file; a
            # read-only handle has none of its own, so its close needs no
            # FLUSH round trip (one of the five requests a small-file read makes).
            fi.noflush = True
        return fi

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent_inode = self._in(parent_inode)
        fh, a, direct = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, direct_io=direct), self._entry(a)

    @_errors
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        return await self.vfs.write(fh, off, buf)

    @_errors
    async def flush(self, fh):
        await self.vfs.flush(fh)

    @_errors
    async def fsync(self, fh, datasync):
        await self.vfs.fsync(fh)

    @_errors
    async def fallocate(self, fh, mode, offset, length):
        await self.vfs.fallocate(fh, mode, offset, length)

    @_errors
    async def release(self, fh):
        await self.vfs.release(fh)

    @_errors
    async def opendir(self, inode, ctx):
        inode = self._in(inode)
        fh, keep = await self.vfs.opendir(inode)
        if _CACHE_READDIR:  # the patched pyfuse3 (.ci/patches): the kernel caches listings
            return pyfuse3.FileInfo(fh=fh, keep_cache=keep, cache_readdir=True)
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        if _PLAIN_READDIR and not token.plus:
            # A plain listing: the kernel keeps only inode and type.
            while batch := await self.vfs.readdir_names(fh, start_id):
                for name, ino, mode, start_id in batch:
                    e = pyfuse3.EntryAttributes()
                    e.st_ino = pyfuse3.ROOT_INODE if ino == self.root else ino
                    e.st_mode = mode
                    if not pyfuse3.readdir_reply(token, name, e, start_id):
                        return
            return
        while True:
            batch = await self.vfs.readdir(fh, start_id)
            if not batch:
                return
            for name, a, next_id in batch:
                if not pyfuse3.readdir_reply(token, name, self._entry(a), next_id):
                    return
                start_id = next_id

    @_errors
    async def releasedir(self, fh):
        await self.vfs.releasedir(fh)

    async def fsyncdir(self, fh, datasync):
        pass

    @_errors
    async def statfs(self, ctx):
        total, used, itotal, iused = await self.vfs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = max(0, total - used) // 4096
        s.f_files = itotal
        s.f_ffree = s.f_favail = max(0, itotal - iused)
        s.f_namemax = 255
        return s

    # With --no-xattr, ENOSYS: the kernel then answers every later xattr
    # call itself (EOPNOTSUPP) and stops asking, before writes included.
    def _xattrs_on(self) -> None:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def getxattr(self, inode, name, ctx):
        self._xattrs_on()
        inode = self._in(inode)
        return await self.vfs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode, ctx):
        self._xattrs_on()
        inode = self._in(inode)
        return await self.vfs.listxattr(inode)

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        self._xattrs_on()
        inode = self._in(inode)
        await self.vfs.setxattr(inode, name, value)

    @_errors
    async def removexattr(self, inode, name, ctx):
        self._xattrs_on()
        inode = self._in(inode)
        await self.vfs.removexattr(inode, name)

    async def access(self, inode, mode, ctx):
        # Only reached without default_permissions; the kernel checks modes otherwise.
        return True

    async def forget(self, inode_list):
        pass
