"""The virtual filesystem: open handles, readers and writers over meta + cache.

Everything here speaks inodes, offsets and OSError; the FUSE layer above only
translates. Consistency model (as JuiceFS and NFS): close-to-open. open()
uses fresh attributes (see FRESH), so a file changed by another node is read
anew once the kernel's attribute timeout has passed; a handle that stays open
keeps reading the slices it resolved unless this node changes the file.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from ..layout import CHUNK_SIZE, MAX_FILE_SIZE, Segment, block_key, resolve, slice_block_keys
from ..meta.engine import HEARTBEAT, ROOT_INODE, TYPES, Attr, Meta, RedisUnavailable, Slice
from ..cache.blocks import MissingBlock
from ..metrics import Metrics
from .compact import COMPACT_AT, SLOW_AT, compact_chunk
from .internal import NAMES, Internal
from .reader import read_segments
from .writer import FileWriter, WriteBudget

log = logging.getLogger("jfscache.vfs")

FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10  # linux/falloc.h
# POSIX ACLs are not implemented: answering EOPNOTSUPP for them (as a file
# system mounted without ACL support does) makes cp -a, rsync -A and tar
# fall back to chmod. Storing them as plain xattrs would "succeed", and those
# tools would then skip the chmod and leave every copy at its creation mode.
#
# SELinux labels are not stored either: a host running SELinux labels a FUSE
# mount by policy (genfscon, or the context= mount option), answers
# security.selinux queries itself and refuses to set it on such a mount, so
# the query reaches this file system only on hosts without SELinux, where no
# one uses it. Answering it EOPNOTSUPP there (as GlusterFS does unless mounted
# with --selinux) lets `ls -l` remember that this device has no labels after
# its first file: otherwise it asks once per file, a FUSE round trip each,
# most of the time of `ls -l` on a big directory.
UNSUPPORTED_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default", b"security.selinux")
# open() and getattr() fetch fresh attributes (close-to-open consistency),
# unless this node read them this recently and has not changed the inode
# since: the kernel's lookup, open and the application's fstat() of one
# open() then cost one round trip instead of three.
FRESH = 0.1
INTERNAL = frozenset(NAMES.values())  # inodes of the virtual files
LIST_AHEAD = 256  # attributes fetched per round trip in a stat pass over a listing
FILE_CHUNKS = 100  # chunks of a deleted file handled per batch
# After a removal wakes the deleter, it waits this long for more (an rm -rf
# goes on): fewer, fuller DeleteObjects requests. Without it, a pass took
# what a few milliseconds of removals had queued (an rm -rf of 300 files:
# 13-21 requests; tests/test_safety.py allows 10).
DELETE_GATHER = 0.5


class _Pass:
    """A stat or lookup pass over one listing: how far ahead to fetch. The
    window doubles (up to LIST_AHEAD) while each miss falls where the last
    fetch ended or within the span after it, as in ls -l or find, and falls
    back to one entry when a miss lands elsewhere: a program that lists a
    directory, then stats its files shuffled fetched 256 entries per file
    (here 2,000 stats of a 10,000-file directory: ~800/s, against 2,300-5,600
    now)."""
    __slots__ = ("items", "next", "window")

    def __init__(self, items: list):
        self.items = items
        self.next = -1
        self.window = 0

    def batch(self, i: int) -> list:
        """The entries to fetch for a miss on entry i (i first)."""
        follows = self.next <= i < self.next + self.window
        self.window = min(LIST_AHEAD, 2 * self.window) if follows else 1
        self.next = i + self.window
        return self.items[i:self.next]


@dataclass
class Handle:
    ino: int
    flags: int
    entries: list | None = None  # directory snapshot
    attrs: dict | None = None  # snapshot index -> Attr (None: vanished)
    next_off: int = -1  # where a sequential reader would read next
    seq: int = 0  # consecutive sequential reads, drives readahead depth
    loading: set = field(default_factory=set)  # chunks whose slices readahead is loading
    internal: object | None = None  # state of an open virtual file (internal.py)


@dataclass
class Options:
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    max_uploads: int = 20
    buffer_size: int = 300 << 20
    prefetch: int = 8  # blocks ahead of a sequential reader, at most
    readdir_cache: bool = False  # let the kernel cache listings (see opendir)
    xattrs: bool = True  # False: extended attributes "not implemented" (fuse/ops.py)
    compact_grace: float = 600.0  # seconds a compacted slice's objects outlive it (readers of old lists)
    missing_wait: float = 60.0  # seconds a read waits for a block not in the store yet (staged on its writer)


@dataclass
class _OpenFile:
    count: int = 0
    mtime: int = -1  # attributes seen at the last open, to decide keep_cache
    length: int = -1
    chunks: dict = field(default_factory=dict)  # indx -> list[Segment]


class VFS:
    def __init__(self, meta: Meta, cache, opts: Options, warmer=None, metrics: Metrics | None = None):
        self.meta = meta
        self.cache = cache
        self.metrics = metrics if metrics is not None else Metrics()
        self.opts = opts
        self.warmer = warmer  # where warmup sends blocks (fill.Warmer): the cache group or the local cache
        self.internal = Internal(self)
        # Further .control requests: op -> async handler(request) -> answer (internal.py).
        self.controls: dict[str, Callable[[dict], Awaitable[dict]]] = {}
        self.root = ROOT_INODE  # the mount's root directory (another one with --subdir)
        s = meta.settings
        self.volume = s["name"]
        self.bs = int(s.get("block_size", 4 << 20))
        self.budget = WriteBudget(opts.buffer_size)
        self.upload_limiter = trio.CapacityLimiter(opts.max_uploads)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.files: dict[int, _OpenFile] = {}  # inodes with open handles (and recently opened)
        self.writers: dict[int, FileWriter] = {}
        self.unlinked_open: set[int] = set()
        self.nursery: trio.Nursery | None = None
        self._delete_wakeup = trio.Event()
        self._fresh: dict[int, tuple] = {}  # inode -> (when, Attr, chunk 0's slices or None)
        self._no_xattr: dict[int, float] = {}  # inode -> until when it is known to have no xattrs
        self._listed: dict[int, tuple[_Pass, int]] = {}  # inode -> (its last listing's inodes, position)
        self._listed_names: dict[tuple[int, bytes], tuple[_Pass, int]] = {}  # likewise, by (dir, name)
        self._entries: dict[int, dict[bytes, tuple[float, int]]] = {}  # dir -> name -> (when looked up, inode)
        self._ahead: dict[int, tuple[float, Attr]] = {}  # inode -> (when fetched ahead, Attr)
        self._listed_at: dict[int, float] = {}  # dir -> when its last listing from the start was taken
        self._compacting: dict[tuple[int, int], trio.Event] = {}  # chunks being compacted

    # ---- lifecycle --------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        nursery.start_soon(self._heartbeat_loop)
        nursery.start_soon(self._delete_loop)
        if self.cache.staging is not None:
            nursery.start_soon(self._staging_loop)

    async def shutdown(self) -> None:
        """Flush every dirty file; called on unmount and on SIGTERM."""
        for fw in list(self.writers.values()):
            try:
                await fw.flush()
            except OSError as e:
                log.error("flushing inode %d at shutdown failed: %s", fw.ino, e)
        for ino in list(self.unlinked_open):
            await self.meta.drop(ino)
        self.unlinked_open.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT)
            try:
                await self.meta.heartbeat()
            except RedisUnavailable:
                pass  # the client logs each outage once
            except Exception as e:
                log.warning("session heartbeat failed: %s", e)

    async def _staging_loop(self) -> None:
        """Publish this node's pending uploads (`jfscache status`)."""
        st = self.cache.staging
        where = f"{socket.gethostname()}:{st.root}"
        shown = None
        while True:
            now = (len(st.pending), st.bytes)
            if now != shown:
                try:
                    await self.meta.set_pending_uploads(where, *now)
                    shown = now
                except Exception as e:  # shown again at the next change
                    log.debug("publishing pending uploads failed: %s", e)
            await trio.sleep(1)

    async def _delete_loop(self) -> None:
        while True:
            with trio.move_on_after(10):
                await self._delete_wakeup.wait()
            await trio.sleep(DELETE_GATHER)
            self._delete_wakeup = trio.Event()
            try:
                await self._delete_pending()
            except RedisUnavailable:
                pass  # the client logs each outage once; the queue waits in Redis
            except Exception as e:
                log.warning("deleting unreferenced data failed (will retry): %s", e)

    async def _delete_pending(self) -> None:
        """Delete the data of removed files and truncated chunks, a batch at
        a time, so a huge file never makes one long Redis call. Objects go
        first, in batch requests across files; what pointed at them is
        forgotten after (a crash in between only repeats the deletes)."""
        while True:
            # A batch of files in a few round trips (it was ~7 per file).
            files = await self.meta.deleted_files()
            inos = [int(member.split(b":")[0]) for member in files]
            batch = await self.meta.files_chunks(inos, FILE_CHUNKS)
            for k, ino in enumerate(inos):
                while len(batch[k]) == FILE_CHUNKS:   # a big file: its chunks a batch at a time
                    await self.cache.remove(await self._unref(s for _, slices in batch[k] for s in slices))
                    await self.meta.forget_chunks([(ino, [i for i, _ in batch[k]])])
                    (batch[k],) = await self.meta.files_chunks([ino], FILE_CHUNKS)
            await self.cache.remove(await self._unref(s for chunks in batch for _, slices in chunks for s in slices))
            await self.meta.forget_chunks([(ino, [i for i, _ in chunks]) for ino, chunks in zip(inos, batch)])
            await self.meta.forget_files(list(zip(files, inos)))
            cut = await self.meta.take_cut_chunks()
            await self.cache.remove(await self._unref(s for _, slices in cut for s in slices))
            await self.meta.forget_keys([k for k, _ in cut])
            slices = await self.meta.take_slices()
            await self.cache.remove(await self._unref(slices))
            replaced = await self.meta.compacted_due(time.time() - self.opts.compact_grace)
            await self.cache.remove(await self._unref(Slice.unpack(b) for b in replaced))
            await self.meta.forget_compacted(replaced)
            if not files and not cut and not slices and not replaced:
                return

    async def _unref(self, slices) -> list[str]:
        """Drop one reference per distinct slice entry (an entry sent twice
        by a retried commit counts once); the block keys of the slices that
        have none left, to delete."""
        distinct = {(s.pos, s.id, s.size, s.off, s.len): s for s in slices if s.id}
        sizes = {s.id: s.size for s in distinct.values()}
        gone = await self.meta.unref([(s.id, f"{s.off}:{s.len}") for s in distinct.values()])
        return [key for sid in gone for key in slice_block_keys(self.volume, sid, sizes[sid], self.bs)]

    # ---- compaction -------------------------------------------------------
    def _compact_soon(self, ino: int, indx: int) -> trio.Event:
        """Compact a chunk in the background (once at a time per chunk);
        returns an event set when it is done."""
        done = self._compacting.get((ino, indx))
        if done is None:
            done = self._compacting[(ino, indx)] = trio.Event()
            self.nursery.start_soon(self._compact, ino, indx, done)
        return done

    async def _compact(self, ino: int, indx: int, done: trio.Event) -> None:
        try:
            if await compact_chunk(self.meta, self.cache, self.volume, self.bs, ino, indx):
                self.metrics.compactions += 1
                of = self.files.get(ino)
                if of is not None:
                    of.chunks.pop(indx, None)
        except Exception as e:  # the chunk stays as it was; the next write tries again
            log.warning("compacting chunk %d of inode %d failed: %s", indx, ino, e)
        finally:
            del self._compacting[(ino, indx)]
            done.set()

    # ---- attributes -------------------------------------------------------
    def _overlay(self, a: Attr) -> Attr:
        """Attributes as this node's buffered writes will make them."""
        fw = self.writers.get(a.ino)
        if fw is not None:
            a = dataclasses.replace(a, length=max(a.length, fw.length) + len(fw.appends), mtime=max(a.mtime, fw.mtime),
                                    ctime=max(a.ctime, fw.mtime))
        return a

    def _saw(self, a: Attr, chunk0: list[Slice] | None = None) -> Attr:
        """Remember when these attributes (and chunk 0's slices, when read in
        the same round trip) were read, for open() and getattr() (see FRESH)."""
        if len(self._fresh) > 100_000:
            self._fresh.clear()
            self._no_xattr.clear()
        now = time.monotonic()
        self._fresh[a.ino] = (now, a, chunk0)
        if a.xattr:
            self._no_xattr.pop(a.ino, None)
        else:
            self._no_xattr[a.ino] = now + self.opts.attr_timeout
        return a

    def _changed(self, *inos: int) -> None:
        """This node changed these inodes: forget their remembered attributes
        (and, for directories, the entries remembered in them)."""
        for ino in inos:
            self._fresh.pop(ino, None)
            self._entries.pop(ino, None)
            self._ahead.pop(ino, None)

    def _names_changed(self, parent: int, *names: bytes) -> None:
        """This node changed these names of a directory: forget the
        directory's attributes and those names, but keep what is remembered
        of its other names. (Forgetting them all made each rename in a
        directory listed a moment before fetch the next 256 names again.)"""
        self._fresh.pop(parent, None)
        self._ahead.pop(parent, None)
        self._listed_at.pop(parent, None)
        known = self._entries.get(parent)
        if known:
            for name in names:
                known.pop(name, None)

    def _recent(self, ino: int) -> tuple | None:
        seen = self._fresh.get(ino)
        if seen is not None and time.monotonic() - seen[0] < FRESH:
            return seen
        return None

    async def getattr(self, ino: int) -> Attr:
        if ino in INTERNAL:
            return self.internal.attr(ino)
        seen = self._recent(ino)
        if seen is not None:  # e.g. the fstat() that follows an open()
            return self._overlay(seen[1])
        got = self._ahead.get(ino)
        if got is not None and time.monotonic() - got[0] < self.opts.attr_timeout:
            return self._overlay(got[1])
        listed = self._listed.get(ino)
        if listed is not None:
            # A stat pass over a listing (ls -l of a listing the kernel had
            # cached, or of one so long that the attributes readdirplus gave
            # expired): fetch the next entries' attributes too, in one round
            # trip.
            inos, i = listed
            await self._fetch_ahead(inos.batch(i))
            got = self._ahead.get(ino)
            if got is not None:
                return self._overlay(got[1])
        return self._overlay(self._saw(await self.meta.getattr(ino)))

    async def lookup(self, parent: int, name: bytes) -> Attr:
        ino = self.internal.lookup(parent, name)
        if ino is not None:
            return self.internal.attr(ino)
        now = time.monotonic()
        seen = self._entries.get(parent, {}).get(name)
        if seen is None or now - seen[0] >= self.opts.entry_timeout:
            listed = self._listed_names.get((parent, name))
            if listed is not None:
                # A lookup pass over a listing the kernel served from its
                # cache (its entries expired): look the next names up too.
                names, i = listed
                batch = names.batch(i)
                # One name (a pass in another order, e.g. a DataLoader's
                # shuffled one): the lookup script below is one round trip
                # and brings chunk 0's slices for open(); lookup_many is two,
                # and the first read then fetched the slices in a third.
                if len(batch) > 1:
                    known = self._entries.setdefault(parent, {})
                    attrs = await self.meta.lookup_many(parent, batch)
                    self._keep_ahead(attrs)
                    for n, a in zip(batch, attrs):
                        if a is not None:
                            known[n] = (now, a.ino)
            seen = self._entries.get(parent, {}).get(name)
        if seen is not None and now - seen[0] < self.opts.entry_timeout:
            got = self._ahead.get(seen[1])
            if got is not None and now - got[0] < self.opts.attr_timeout:
                return self._overlay(got[1])
        return self._overlay(self._saw(*await self.meta.lookup(parent, name)))

    async def _fetch_ahead(self, inos: list[int]) -> None:
        self._keep_ahead(await self.meta.getattrs(inos))

    def _keep_ahead(self, attrs: list[Attr | None]) -> None:
        """Attributes fetched ahead of a stat pass over a listing. They are
        served for the attribute timeout from when they were fetched: the
        consistency readdirplus gives the kernel's own attribute cache."""
        if len(self._ahead) > 200_000:
            self._ahead.clear()
        now = time.monotonic()
        for a in attrs:
            if a is not None:
                self._ahead[a.ino] = (now, self._saw(a))

    async def setattr(self, ino: int, *, size: int | None = None, **fields) -> Attr:
        # Buffered writes commit with mtime = now: flush them first so that
        # they cannot override explicit times, or land after a truncate.
        await self._flush_ino(ino)
        self._changed(ino)
        a = None
        if size is not None:
            a = await self.meta.truncate(ino, size)
            self._delete_wakeup.set()  # cut chunks (if any) wait in delchunks
            of = self.files.get(ino)
            if of is not None:
                of.chunks.clear()
                of.length = size
        if fields:
            a = await self.meta.setattr(ino, **fields)
        return self._overlay(a if a is not None else await self.meta.getattr(ino))

    # ---- namespace --------------------------------------------------------
    async def mknod(self, parent: int, name: bytes, typ: str, mode: int, uid: int, gid: int,
                    rdev: int = 0, target: bytes = b"") -> Attr:
        self._names_changed(parent, name)
        a, pa = await self.meta.mknod(parent, name, typ, mode, uid, gid, rdev, target)
        self._saw(pa)
        return self._saw(a)

    async def readlink(self, ino: int) -> bytes:
        return await self.meta.readlink(ino)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        self._changed(ino)
        self._names_changed(parent, name)
        return self._overlay(await self.meta.link(ino, parent, name))

    async def _released_link(self, ino: int, waits: bool) -> None:
        """After a name went away: delete the file now, or at its last close."""
        if not waits:
            return
        of = self.files.get(ino)
        if of is not None and of.count > 0:
            self.unlinked_open.add(ino)
        else:
            self.writers.pop(ino, None)
            await self.meta.drop(ino)
            self._delete_wakeup.set()

    async def unlink(self, parent: int, name: bytes) -> None:
        self._names_changed(parent, name)
        ino, waits = await self.meta.unlink(parent, name)
        self._changed(ino)
        await self._released_link(ino, waits)

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._names_changed(parent, name)
        self._changed(await self.meta.rmdir(parent, name))

    async def rename(self, psrc: int, nsrc: bytes, pdst: int, ndst: bytes, flags: int) -> None:
        self._names_changed(psrc, nsrc)
        self._names_changed(pdst, ndst)
        moved, replaced, waits = await self.meta.rename(psrc, nsrc, pdst, ndst, flags)
        self._changed(moved, replaced)
        await self._released_link(replaced, waits)

    # ---- files ------------------------------------------------------------
    def _new_handle(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(ino, flags)
        return fh

    async def open(self, ino: int, flags: int) -> tuple[int, bool, bool]:
        """Returns (handle, whether the kernel may keep its cached pages,
        whether to use direct I/O)."""
        if ino in INTERNAL:
            fh = self._new_handle(ino, flags)
            self.handles[fh].internal = self.internal.open(ino)
            return fh, False, True
        seen = self._recent(ino)
        if seen is not None:
            _, a, slices = seen
            mtime, length = a.mtime, a.length
        else:
            # Fresh attributes, and the first chunk's slices in the same round
            # trip: most files read after open() are small.
            a, slices = await self.meta.getattr_and_chunk(ino, 0)
            mtime, length = self._saw(a, slices).mtime, a.length
        of = self.files.setdefault(ino, _OpenFile())
        unchanged = of.mtime == mtime and of.length == length and ino not in self.writers
        if not unchanged:
            of.chunks.clear()
        if slices is not None and 0 not in of.chunks:
            of.chunks[0] = resolve(slices)
        of.mtime, of.length = mtime, length
        of.count += 1
        if flags & os.O_TRUNC and (length or ino in self.writers):  # libfuse asks for atomic_o_trunc
            await self.setattr(ino, size=0)
            unchanged = False
        # Appending handles use direct I/O: the kernel then keeps no pages of
        # a file whose end other nodes move.
        return self._new_handle(ino, flags), unchanged, bool(flags & os.O_APPEND)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, Attr, bool]:
        """Returns (handle, attributes, whether to use direct I/O)."""
        self._names_changed(parent, name)
        try:
            a, pa = await self.meta.mknod(parent, name, "f", mode, uid, gid)
            self._saw(pa)
            self._saw(a)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Lost a race with another creator: open what is there, as open(2) would.
            a = await self.lookup(parent, name)
            fh, _, direct = await self.open(a.ino, flags)
            return fh, a, direct
        of = self.files.setdefault(a.ino, _OpenFile())
        of.count += 1
        of.mtime, of.length = a.mtime, 0
        return self._new_handle(a.ino, flags), a, bool(flags & os.O_APPEND)

    def _writer(self, ino: int) -> FileWriter:
        fw = self.writers.get(ino)
        if fw is None:
            fw = self.writers[ino] = FileWriter(
                ino, meta=self.meta, cache=self.cache, volume=self.volume, bs=self.bs, budget=self.budget,
                upload_limiter=self.upload_limiter, nursery=self.nursery, on_commit=self._committed)
        return fw

    def _committed(self, ino: int, indx: int | None, length: int, count: int = 0) -> trio.Event | None:
        """Slices of chunk `indx` (None: of any chunk, an append) were
        committed and the chunk now has `count` slices. Returns an event to
        wait for when the writer must slow down for a compaction."""
        self._changed(ino)
        of = self.files.get(ino)
        if of is not None:
            if indx is None:
                of.chunks.clear()
            else:
                of.chunks.pop(indx, None)
            of.length = max(of.length, length)
        if indx is not None and count >= COMPACT_AT:
            done = self._compact_soon(ino, indx)
            return done if count >= SLOW_AT else None
        return None

    async def write(self, fh: int, off: int, data) -> int:
        h = self.handles[fh]
        if h.internal is not None:
            return await self.internal.write(h.ino, h.internal, off, data)
        if off + len(data) > MAX_FILE_SIZE:
            # As ext4: a write that crosses the limit is cut short, one at it fails.
            if off >= MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            data = memoryview(data)[:MAX_FILE_SIZE - off]
        self._changed(h.ino)
        if h.flags & os.O_APPEND:
            # The kernel's offset is the size it has cached, which another
            # node may have outgrown: the record lands at the true end when
            # it is committed (flush, fsync, close, or a block's worth).
            await self._writer(h.ino).append(data)
        else:
            await self._writer(h.ino).write(off, data)
        self.metrics.fuse_write_bytes += len(data)
        return len(data)

    async def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is not None:
            await self._flush_ino(h.ino)

    async def _flush_ino(self, ino: int) -> None:
        fw = self.writers.get(ino)
        if fw is None:
            return
        try:
            await fw.flush()
        finally:
            if not fw.dirty and self.writers.get(ino) is fw:
                del self.writers[ino]

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) with ext4's semantics for the modes the kernel sends:
        0 (extend the size, new bytes read as zeros), KEEP_SIZE (nothing to
        reserve in an object store), PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE
        [|KEEP_SIZE] (the range reads as zeros: a zero slice, no upload)."""
        h = self.handles[fh]
        if h.internal is not None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        if mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) or (
                mode & FALLOC_PUNCH_HOLE and mode & FALLOC_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        end = off + length
        if end > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        await self._flush_ino(h.ino)  # buffered writes land first, as they were issued first
        size = (await self.meta.getattr(h.ino)).length
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            zero_end = end if not mode & FALLOC_KEEP_SIZE else min(end, size)
            pos = off
            while pos < zero_end:
                indx, coff = divmod(pos, CHUNK_SIZE)
                n = min(zero_end - pos, CHUNK_SIZE - coff)
                new_len, _ = await self.meta.write_slice(h.ino, indx, Slice(coff, 0, 0, 0, n))
                self._committed(h.ino, indx, new_len)
                pos += n
        if not mode & FALLOC_KEEP_SIZE and end > size:
            await self.setattr(h.ino, size=end)
        self._changed(h.ino)

    async def fsync(self, fh: int) -> None:
        await self.flush(fh)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.internal is not None:
            self.internal.release(h.internal)
            return
        of = self.files.get(h.ino)
        if of is not None:
            of.count -= 1
            if of.count <= 0:
                try:
                    await self._flush_ino(h.ino)
                finally:
                    if h.ino in self.unlinked_open:
                        self.unlinked_open.discard(h.ino)
                        self.files.pop(h.ino, None)
                        await self.meta.drop(h.ino)
                        self._delete_wakeup.set()
                    elif len(self.files) > 10000:
                        self.files.pop(h.ino, None)

    async def _segments(self, ino: int, indx: int, of: _OpenFile) -> list[Segment]:
        segs = of.chunks.get(indx)
        if segs is None:
            segs = of.chunks[indx] = resolve(await self.meta.read_chunk(ino, indx))
        return segs

    async def read(self, fh: int, off: int, size: int):
        h = self.handles[fh]
        ino = h.ino
        if h.internal is not None:
            return await self.internal.read(ino, h.internal, off, size)
        fw = self.writers.get(ino)
        if fw is not None and fw.dirty:
            await self._flush_ino(ino)
        of = self.files[ino]
        end = min(off + size, of.length)
        if off >= end:
            return b""
        self._readahead(h, of, off, end)
        self.metrics.fuse_read_bytes += end - off
        pieces = []
        pos = off
        while pos < end:
            indx, coff = divmod(pos, CHUNK_SIZE)
            n = min(end - pos, CHUNK_SIZE - coff)
            pieces += await self._read_chunk(ino, indx, coff, n, of)
            pos += n
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    async def _read_chunk(self, ino: int, indx: int, coff: int, n: int, of: _OpenFile) -> list:
        """The bytes [coff, coff+n) of a chunk as a list of buffers."""
        segs = await self._segments(ino, indx, of)
        deadline, delay = trio.current_time() + self.opts.missing_wait, 0.0
        while True:
            try:
                return await read_segments(self.cache, self.volume, self.bs, segs, coff, n)
            except MissingBlock:
                # Either the slice list this handle resolved is out of date (a
                # compaction past its grace period, or a truncate on another
                # node, removed a block it names: the chunk as it is now has
                # the same bytes), or the block's writer staged it and has not
                # uploaded it yet (it lands within seconds unless the store is
                # down): look again, then wait a bounded time for it.
                if trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(max(2 * delay, 0.1), 5.0)
                of.chunks.pop(indx, None)
                segs = await self._segments(ino, indx, of)

    def _readahead(self, h: Handle, of: _OpenFile, off: int, end: int) -> None:
        """Prefetch the blocks after a sequential reader, deeper as it keeps
        going, across chunk boundaries (a chunk's slices are loaded ahead too,
        so the reader does not stall at every 64 MiB)."""
        if off == h.next_off or off == 0:
            h.seq += 1
        else:
            h.seq = 0
        h.next_off = end
        if h.seq < 2 or self.opts.prefetch <= 0:
            return
        stop = min(of.length, end + min(self.opts.prefetch, h.seq) * self.bs)
        pos = end
        while pos < stop:
            indx = pos // CHUNK_SIZE
            base = indx * CHUNK_SIZE
            lo, hi = pos - base, min(stop - base, CHUNK_SIZE)
            segs = of.chunks.get(indx)
            if segs is not None:
                self._prefetch_range(segs, lo, hi)
            elif indx not in h.loading:
                h.loading.add(indx)
                self.nursery.start_soon(self._load_ahead, h, of, indx, lo, hi)
            pos = base + CHUNK_SIZE

    async def _load_ahead(self, h: Handle, of: _OpenFile, indx: int, lo: int, hi: int) -> None:
        try:
            segs = await self._segments(h.ino, indx, of)
            self._prefetch_range(segs, lo, hi)
        except Exception as e:  # only a hint: the read itself will report it
            log.debug("loading chunk %d of inode %d ahead failed: %s", indx, h.ino, e)
        finally:
            h.loading.discard(indx)

    def _prefetch_range(self, segs: list[Segment], lo: int, hi: int) -> None:
        """Prefetch the blocks behind chunk offsets [lo, hi)."""
        for g in segs:
            if g.end <= lo or g.sid == 0:
                continue
            if g.start >= hi:
                break
            a, b = max(g.start, lo), min(g.end, hi)
            first = (g.soff + a - g.start) // self.bs
            last = (g.soff + b - g.start - 1) // self.bs
            for bi in range(first, last + 1):
                self.cache.prefetch(block_key(self.volume, g.sid, bi, min(self.bs, g.ssize - bi * self.bs)))

    # ---- directories ------------------------------------------------------
    async def opendir(self, ino: int) -> tuple[int, bool]:
        """A directory handle, and whether the kernel may serve this listing
        from the one it cached (it caches every listing; the patched pyfuse3).

        By default only within the attribute timeout of the last listing
        this daemon served: a repeated `ls`, or a DataLoader's workers each
        listing the same directory, cost nothing, and another node's change
        shows as late as a stat would show it. Later, the listing is a fresh
        one, and the kernel asks for attributes with it where it expects
        lookups (readdir() for `ls -l`, readdir_names() for `ls`), so the
        stat pass of `ls -l` is served by the kernel. (A cached listing
        brings no attributes: `ls -l` of 20,000 files after they expired
        took 5.3 s, against 2.3 s after a readdirplus. The same holds for
        `ls -l` within a second of a plain `ls`: its stats are lookups,
        fetched ahead in batches by _Pass.)

        With --readdir-cache, the kernel keeps a listing until this mount
        changes the directory, or its attributes expire and show a new
        mtime. The kernel also drops it in both of those cases by default."""
        if self.opts.readdir_cache:
            keep = True
        else:
            at = self._listed_at.get(ino)
            keep = at is not None and time.monotonic() - at < min(self.opts.attr_timeout, self.opts.entry_timeout)
        return self._new_handle(ino, 0), keep

    async def readdir(self, fh: int, start: int, count: int = 512) -> list[tuple[bytes, Attr, int]]:
        """Entries from offset `start` of a snapshot taken when reading starts
        at offset 0, so offsets stay valid while the directory changes.
        Attributes are fetched `count` at a time and kept with the snapshot:
        the kernel asks for ~200 entries per request (32 KiB, see
        st_blksize in fuse/ops.py)."""
        h = self.handles[fh]
        if h.entries is None or start == 0:
            await self._snapshot(h)
        out = []
        i, n = start, len(h.entries)
        while i < n and len(out) < count:
            if i not in h.attrs:
                inos = [ino for _, ino, _ in h.entries[i:i + count]]
                for j, a in enumerate(await self.meta.getattrs(inos), i):
                    h.attrs[j] = a if a is None else self._saw(a)
            a = h.attrs[i]
            if a is not None:  # else removed since the snapshot
                out.append((h.entries[i][0], self._overlay(a), i + 1))
            i += 1
        return out

    async def readdir_names(self, fh: int, start: int, count: int = 256) -> list[tuple[bytes, int, int, int]]:
        """Entries as (name, inode, file type bits of st_mode, next offset)
        for a plain listing (no attributes: the kernel did not ask for them),
        from the same snapshot as readdir()."""
        h = self.handles[fh]
        if h.entries is None or start == 0:
            await self._snapshot(h)
        return [(name, ino, TYPES[typ], i) for i, (name, ino, typ) in enumerate(h.entries[start:start + count], start + 1)]

    async def _snapshot(self, h) -> None:
        """Take the listing that offsets of this handle refer to, and
        remember it for the passes that follow it (_Pass)."""
        taken = time.monotonic()
        parent, ents = await self.meta.readdir(h.ino)
        # In name order (Redis gives hash order): ls -l and programs that
        # sort a listing then stat or open entries in the listing's own
        # order, which fetches their attributes ahead (_Pass). Sorting
        # 10,000 names takes ~3 ms.
        ents.sort()
        up = h.ino if h.ino == self.root else (parent or ROOT_INODE)  # nothing above a --subdir root
        h.entries = [(b".", h.ino, "d"), (b"..", up, "d")] + ents
        h.attrs = {}
        if len(self._listed) + len(ents) > 1_000_000:
            self._listed.clear()
            self._listed_names.clear()
            self._entries.clear()
            self._listed_at.clear()
        self._listed_at[h.ino] = taken
        inos = _Pass([ino for _, ino, _ in ents])
        names = _Pass([name for name, _, _ in ents])
        self._listed.update((ino, (inos, i)) for i, ino in enumerate(inos.items))
        self._listed_names.update(((h.ino, name), (names, i)) for i, name in enumerate(names.items))

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # ---- misc -------------------------------------------------------------
    async def statfs(self) -> tuple[int, int, int, int]:
        return await self.meta.statfs()

    def _no_xattrs(self, ino: int) -> bool:
        """Whether attributes read within the attribute timeout say the inode
        has no xattrs. ls -l asks for two xattrs per file and the kernel asks
        for security.capability before every write: the usual answer, "none",
        then costs no Redis round trip (writes do not change xattrs, so they
        keep this). Another node's new xattr shows up within the attribute
        timeout, as its other attribute changes do."""
        until = self._no_xattr.get(ino)
        return until is not None and until > time.monotonic()

    async def _known_without_xattrs(self, ino: int) -> bool:
        """_no_xattrs, and for an entry of a listing whose attributes expired
        meanwhile (`ls -l` of a directory too long to pass in one attribute
        timeout asks for two xattrs per entry), the attributes of the next
        entries fetched in one round trip, as a stat pass does."""
        if ino in INTERNAL or self._no_xattrs(ino):
            return True
        seen = self._fresh.get(ino)
        if seen is not None and time.monotonic() - seen[0] < self.opts.attr_timeout:
            return False  # it has some: ask Redis for them
        listed = self._listed.get(ino)
        if listed is None:
            return False
        inos, i = listed
        await self._fetch_ahead(inos.batch(i))
        return self._no_xattrs(ino)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if name in UNSUPPORTED_XATTRS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if await self._known_without_xattrs(ino):
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return await self.meta.getxattr(ino, name)

    async def listxattr(self, ino: int) -> list[bytes]:
        if await self._known_without_xattrs(ino):
            return []
        return await self.meta.listxattr(ino)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if name in UNSUPPORTED_XATTRS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        self._changed(ino)
        self._no_xattr.pop(ino, None)
        await self.meta.setxattr(ino, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        if name in UNSUPPORTED_XATTRS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        self._changed(ino)
        await self.meta.removexattr(ino, name)
