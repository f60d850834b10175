"""Write buffering: slices per chunk, blocks uploaded as they fill, commits in order.

A write lands in the newest open slice of its chunk when it continues it (or
rewrites a part not yet uploaded); otherwise it starts a new slice, and the
previous one is frozen. A block is uploaded as soon as it is full; a frozen
slice uploads its last partial block, waits for all of its uploads and only
then commits its metadata, after the slices frozen before it. So data is
always in the store before metadata points at it, and slices of one file
commit in the order they were written (newest wins on reads).
"""
from __future__ import annotations

import errno
import logging
import os
import time

import trio

from ..layout import CHUNK_SIZE, block_key
from ..meta.engine import Slice

log = logging.getLogger("jfscache.writer")


class WriteBudget:
    """Bytes held in write buffers of all files. A writer above the limit
    waits for uploads to drain, so memory stays bounded (slower, not dead)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.uploading = 0
        self._changed = trio.Event()

    def add(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()

    @property
    def over(self) -> bool:
        return self.used > self.limit

    async def wait(self) -> None:
        # Stop waiting when nothing is uploading: what remains are partial
        # blocks of idle files, and waiting for those could never end.
        while self.used > self.limit and self.uploading:
            await self._changed.wait()


class SliceWriter:
    def __init__(self, fw: "FileWriter", indx: int, pos: int, sid: int):
        self.fw = fw
        self.indx = indx
        self.pos = pos  # start within the chunk
        self.id = sid
        self.length = 0
        self.bufs: dict[int, bytearray] = {}
        self.uploaded: set[int] = set()
        self.inflight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.frozen = False
        self.done = trio.Event()

    def can_take(self, coff: int, n: int) -> bool:
        so = coff - self.pos
        if self.frozen or so < 0 or so > self.length:
            return False
        bs = self.fw.bs
        return not any(b in self.uploaded for b in range(so // bs, (so + n - 1) // bs + 1))

    def write(self, so: int, mv: memoryview) -> None:
        bs, budget = self.fw.bs, self.fw.budget
        i = 0
        while i < len(mv):
            bi, bo = divmod(so + i, bs)
            n = min(bs - bo, len(mv) - i)
            buf = self.bufs.get(bi)
            if buf is None:
                buf = self.bufs[bi] = bytearray()
            before = len(buf)
            buf[bo:bo + n] = mv[i:i + n]
            budget.add(len(buf) - before)
            i += n
            if len(buf) == bs:
                self._upload(bi)
        self.length = max(self.length, so + len(mv))

    def _upload(self, bi: int) -> None:
        # The buffer itself is uploaded and cached, without a copy: from now
        # on nothing writes to it (can_take refuses uploaded blocks).
        data = self.bufs.pop(bi)
        self.uploaded.add(bi)
        if self.inflight == 0:
            self.idle = trio.Event()
        self.inflight += 1
        self.fw.budget.uploading += 1
        self.fw.nursery.start_soon(self._do_upload, bi, data)

    async def _do_upload(self, bi: int, data: bytearray) -> None:
        fw = self.fw
        try:
            async with fw.upload_limiter:
                await fw.cache.put(block_key(fw.volume, self.id, bi, len(data)), data)
        except Exception as e:
            log.error("upload of slice %d block %d of inode %d failed: %s", self.id, bi, fw.ino, e)
            fw.fail(e)
        finally:
            fw.budget.uploading -= 1
            fw.budget.release(len(data))
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    def freeze(self, prev_done: trio.Event) -> None:
        self.frozen = True
        for bi in sorted(self.bufs):
            self._upload(bi)
        self.fw.nursery.start_soon(self._commit, prev_done)

    async def _commit(self, prev_done: trio.Event) -> None:
        fw = self.fw
        try:
            await self.idle.wait()
            await prev_done.wait()
            if fw.errors == fw.reported and self.length:
                s = Slice(self.pos, self.id, self.length, 0, self.length)
                length, count = await fw.meta.write_slice(fw.ino, self.indx, s)
                log.debug("committed slice %d of inode %d: length %d", self.id, fw.ino, length)
                slow = fw.on_commit(fw.ino, self.indx, length, count)
                if slow is not None:  # too many slices: wait for the compaction
                    await slow.wait()
        except Exception as e:
            log.error("commit of slice %d of inode %d failed: %s", self.id, fw.ino, e)
            fw.fail(e)
        finally:
            self.done.set()


class FileWriter:
    """Dirty data of one inode."""

    def __init__(self, ino: int, *, meta, cache, volume: str, bs: int, budget: WriteBudget,
                 upload_limiter: trio.CapacityLimiter, nursery: trio.Nursery, on_commit):
        self.ino = ino
        self.meta, self.cache, self.volume, self.bs = meta, cache, volume, bs
        self.budget, self.upload_limiter, self.nursery = budget, upload_limiter, nursery
        self.on_commit = on_commit
        self.active: dict[int, SliceWriter] = {}  # newest open slice per chunk
        self.last_done = trio.Event()
        self.last_done.set()
        self.length = 0  # end of the furthest write, for getattr while data is buffered
        self.mtime = 0  # time of the last write, likewise
        # Errors of uploads and commits. Every flush that waited for a failed
        # commit reports it (an fsync must not succeed because a concurrent
        # read's flush saw the error first); writes fail until one has.
        self.error: Exception | None = None
        self.errors = 0
        self.reported = 0
        # O_APPEND writes: bytes whose offset is decided at commit time (the
        # file's true end then, across all nodes), committed in write order.
        self.appends = bytearray()
        self._append_lock = trio.Lock()

    @property
    def dirty(self) -> bool:
        return bool(self.active) or not self.last_done.is_set() or bool(self.appends)

    def _freeze(self, sw: SliceWriter) -> None:
        if self.active.get(sw.indx) is sw:
            del self.active[sw.indx]
        prev, self.last_done = self.last_done, sw.done
        sw.freeze(prev)

    async def write(self, off: int, data) -> None:
        if self.errors != self.reported:
            raise OSError(errno.EIO, f"an earlier write to this file failed: {self.error}")
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            fo = off + done
            indx, coff = divmod(fo, CHUNK_SIZE)
            n = min(len(mv) - done, CHUNK_SIZE - coff)
            sw = self.active.get(indx)
            if sw is None or not sw.can_take(coff, n):
                sid = await self.meta.new_slice_id()
                old = self.active.get(indx)  # may have changed while we waited
                if old is not None:
                    self._freeze(old)
                sw = self.active[indx] = SliceWriter(self, indx, coff, sid)
            sw.write(coff - sw.pos, mv[done:done + n])
            if sw.pos + sw.length == CHUNK_SIZE:
                self._freeze(sw)
            done += n
        self.length = max(self.length, off + len(mv))
        self.mtime = time.time_ns()
        if self.budget.over:
            self.freeze_all()
            await self.budget.wait()

    async def append(self, data) -> None:
        """Buffer an O_APPEND write; a block's worth is committed at once."""
        if self.errors != self.reported:
            raise OSError(errno.EIO, f"an earlier write to this file failed: {self.error}")
        self.appends += data
        self.budget.add(len(data))
        self.mtime = time.time_ns()
        if len(self.appends) >= self.bs:
            await self._commit_appends()

    async def _commit_appends(self) -> None:
        async with self._append_lock:  # in write order, one record after another
            while self.appends:
                data = self.appends[:CHUNK_SIZE]
                del self.appends[:len(data)]
                try:
                    sid = await self.meta.new_slice_id()
                    async with trio.open_nursery() as n:
                        for i in range(0, len(data), self.bs):
                            n.start_soon(self._put_block, sid, i // self.bs, data[i:i + self.bs])
                    length = await self.meta.append_slice(self.ino, sid, len(data))
                finally:
                    self.budget.release(len(data))
                self.on_commit(self.ino, None, length)

    async def _put_block(self, sid: int, bi: int, data) -> None:
        async with self.upload_limiter:
            await self.cache.put(block_key(self.volume, sid, bi, len(data)), data)

    def freeze_all(self) -> None:
        for sw in list(self.active.values()):
            self._freeze(sw)

    def fail(self, e: Exception) -> None:
        self.error = e
        self.errors += 1

    async def flush(self) -> None:
        before = self.reported
        self.freeze_all()
        await self.last_done.wait()
        if self.appends and self.errors == self.reported:
            try:
                await self._commit_appends()
            except OSError:
                raise
            except Exception as e:
                self.fail(e)
        if self.errors != before:
            self.reported = self.errors
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {self.error}")
