"""Staged blocks: written, durable on the local cache disk, not yet in the store.

A block goes here instead of failing the write when the object store does
not take it within --io-timeout (and, with --writeback, before any upload
is tried). Staging returns once the block is durable on the cache disk, so
an fsync that succeeded survives a crash or a reboot of this node. A
background uploader puts the staged blocks into the store, backing off while
it is down. Blocks staged by an earlier daemon with the same cache dir are
found and uploaded at start.

Layout: records appended to segment files `<cache dir>/staging/seg-NNNNNNNN`
(0600 in a 0700 directory). A record is a header (magic, the segment's
generation, lengths), the key, the data and an xxhash64 of all but the magic,
at a 4 KiB-aligned offset. Segments are zero-filled ahead of the writer (in
the background) and reused once all their records are uploaded, so staging a
block costs one pwritev and one fdatasync that flushes only data: ~0.35 ms
for 64 KiB here, against ~5 ms for a file per block (create, fsync, directory
fsync), which made write-back slower than uploading. An uploaded record gets
the magic DONE (not synced: losing that mark only means one more upload of an
immutable block). A reused segment's generation goes up by one, so records of
its earlier life are told apart when a restart scans it: only records of the
newest generation are pending. A damaged record is reported, never uploaded.
"""
from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import random
import re
import struct
import time
from typing import Callable

import trio
import xxhash

from ..metrics import Metrics
from ..storage import StorageError

log = logging.getLogger("jfscache.cache.staging")

_HEAD = struct.Struct(">4sIIH")  # magic, generation, data length, key length
_SUM = struct.Struct(">Q")
MAGIC, DONE = b"JFSS", b"JFSU"
_ALIGN = 4096
SEGMENT_MAX = 64 << 20  # a segment's length; a new one starts past it
_GROW = 8 << 20  # zero-filled room kept ahead of the writer
_MAX_BACKOFF = 30.0
# Write-back holds uploads back during a burst of writes: on this 2-core
# machine a 64 KiB upload costs the daemon ~0.65 ms of its one Python thread
# (and the S3 server as much again), about what the write itself costs, so
# uploading while the burst goes on halved its speed (270 against 530 files/s
# of 64 KiB, fsync each). Uploads start once no block was staged for QUIET
# seconds, or once the oldest staged block has waited `hold` seconds (other
# nodes wait for it that much longer; a steady stream of writes then uploads
# each block `hold` seconds after it was written; well inside the --io-timeout
# that a reader elsewhere waits for a missing block), or once HOLD_BYTES are
# waiting: about what the store here takes in the default hold, so that a held
# burst drains in about as long as it was held.
QUIET = 0.1
HOLD_BYTES = 1 << 30
WRITEBACK_HOLD = 10.0  # `hold` with --writeback
_SEG_NAME = re.compile(r"^seg-(\d{8})$")


def _record_len(klen: int, dlen: int) -> int:
    n = _HEAD.size + klen + dlen + _SUM.size
    return -(-n // _ALIGN) * _ALIGN


def _checksum(head: bytes, key: bytes, data) -> int:
    h = xxhash.xxh64(head[4:])  # not the magic: DONE must not invalidate the record
    h.update(key)
    h.update(data)
    return h.intdigest()


class _Segment:
    __slots__ = ("n", "path", "fd", "gen", "end", "zeroed", "live", "lock")

    def __init__(self, n: int, path: str, fd: int, gen: int, zeroed: int):
        self.n, self.path, self.fd, self.gen = n, path, fd, gen
        self.end = 0  # next record's offset
        self.zeroed = zeroed  # bytes written (zeros or records) and synced: cheap to overwrite
        self.live = 0  # records not uploaded yet (or being written)
        self.lock = trio.Lock()  # one growth at a time


class _Entry:
    __slots__ = ("seg", "off", "size", "path", "staged", "due")

    def __init__(self, seg: _Segment | None, off: int, size: int, path: str | None = None,
                 staged: float = 0.0, due: float = 0.0):
        self.seg, self.off, self.size = seg, off, size
        self.path = path  # a file per block, as staged before segments (uploaded, then removed)
        self.staged = staged  # time.monotonic() it was staged at (0: by an earlier run)
        self.due = due  # time.monotonic() from which it may be uploaded (--upload-delay)


class Staging:
    def __init__(self, cache_dir: str, volume: str, storage, *, free_ratio: float = 0.1,
                 uploads: int = 4, on_uploaded: Callable[[str, bytes], None] | None = None,
                 metrics: Metrics | None = None, upload_delay: float = 0.0, hold: float = 0.0,
                 source: Callable[[str], bytes | None] | None = None):
        self.root = os.path.join(os.path.abspath(cache_dir), "staging")
        self.volume = volume
        self.storage = storage
        self.free_ratio = free_ratio
        self.on_uploaded = on_uploaded  # e.g. keep the block in the disk tier
        self.metrics = metrics if metrics is not None else Metrics()  # uploads are object-store puts
        self.pending: dict[str, int] = {}  # key -> size, in staging order
        self.bytes = 0  # of the pending blocks
        self._entries: dict[str, _Entry] = {}  # in staging order too
        self._segs: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._alloc = trio.Lock()
        self._readers = 0  # reads of segments in flight: no segment is closed meanwhile
        self._nursery: trio.Nursery | None = None
        self._uploading: set[str] = set()
        self._limit = trio.Semaphore(max(1, uploads))  # released by the upload task, not the one that took it
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._failures = 0  # consecutive failed uploads: the back-off grows with them
        self._retry_at = 0.0
        self._full_warned = False
        self.upload_delay = upload_delay  # --upload-delay (left out at unmount)
        self.hold = hold  # write-back's hold during a burst (see QUIET); 0: none
        self._last_stage = 0.0
        # A staged block's bytes if still in memory (the memory tier), so that
        # its upload need not read them back from the disk.
        self.source = source
        self._draining = False
        self.uploaded = 0  # blocks uploaded from here, for .stats

    # ---- lifecycle --------------------------------------------------------
    async def open(self) -> None:
        """Find the blocks an earlier daemon staged here and not uploaded."""
        found, others = await trio.to_thread.run_sync(self._scan)
        for key, entry in found:
            self._add(key, entry)
        if found:
            log.warning("%d staged blocks (%d MiB) from an earlier run wait in %s; uploading them",
                        len(found), self.bytes >> 20, self.root)
        for vol, n in sorted(others.items()):
            log.warning("%d staged blocks of volume %s wait in %s: mount that volume with this "
                        "cache dir to upload them", n, vol, self.root)

    def _scan(self) -> tuple[list[tuple[str, _Entry]], dict[str, int]]:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        found: list[tuple[str, _Entry]] = []
        others: dict[str, int] = {}
        legacy = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            m = _SEG_NAME.match(name)
            if m is None:
                legacy.append(name)
                continue
            fd = os.open(path, os.O_RDWR)
            records = _scan_segment(fd)
            gen = max((r[0] for r in records), default=0)
            seg = self._segs[int(m.group(1))] = _Segment(int(m.group(1)), path, fd, gen, os.fstat(fd).st_size)
            for rgen, off, key, size, done in records:
                if rgen != gen or done:
                    continue  # uploaded: of an earlier life of the segment, or marked
                vol = key.split("/", 1)[0]
                seg.live += 1  # (a segment holding another volume's blocks is never reused)
                if vol != self.volume:
                    others[vol] = others.get(vol, 0) + 1
                    continue
                found.append((key, _Entry(seg, off, size)))
        for name in legacy:  # a file per block, the layout before segments
            key = name.replace(",", "/")
            size = key.rsplit("_", 1)[-1]
            if name.endswith(".corrupt") or not size.isdigit():
                continue  # not a block of ours
            path = os.path.join(self.root, name)
            vol = key.split("/", 1)[0]
            if os.stat(path).st_size != int(size) + _SUM.size:
                log.info("removing %s, a staged write a crash interrupted", path)
                os.unlink(path)
            elif vol != self.volume:
                others[vol] = others.get(vol, 0) + 1
            else:
                found.append((key, _Entry(None, 0, int(size), path)))
        return found, others

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._uploader)

    async def drain(self, stall: float) -> None:
        """Wait (at unmount) until every staged block is uploaded, as long as
        uploads make progress: give up after `stall` seconds without one."""
        self._draining = True
        self._wakeup.set()
        while self.pending:
            before = self.uploaded
            with trio.move_on_after(stall):
                await self._drained.wait()
            if self.uploaded == before:
                break
        if self.pending:
            log.warning("%d staged blocks (%d MiB) are not uploaded yet; they stay in %s and "
                        "upload at the next mount with this cache dir",
                        len(self.pending), self.bytes >> 20, self.root)

    def _add(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self.pending[key] = entry.size
        self.bytes += entry.size
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wakeup.set()

    # ---- room -------------------------------------------------------------
    async def _room(self, need: int) -> tuple[_Segment, int]:
        """A place for a record of `need` bytes, zero-filled and synced."""
        async with self._alloc:
            seg = self._active
            if seg is None or seg.end + need > max(SEGMENT_MAX, need):
                seg = self._active = await self._next_segment()
            if seg.end + need > seg.zeroed:
                await self._grow(seg, seg.end + need)
            off, seg.end = seg.end, seg.end + need
            seg.live += 1
        if (seg.zeroed < SEGMENT_MAX and seg.zeroed - seg.end < _GROW // 2 and self._nursery is not None
                and not seg.lock.locked()):
            self._nursery.start_soon(self._grow_ahead, seg)
        return seg, off

    async def _next_segment(self) -> _Segment:
        for seg in self._segs.values():  # reuse a drained one: already zero-filled
            if seg.live == 0 and seg is not self._active:
                seg.gen, seg.end = seg.gen + 1, 0
                return seg
        n = max(self._segs, default=0) + 1
        path = os.path.join(self.root, f"seg-{n:08d}")
        fd = await trio.to_thread.run_sync(_create, path, self.root)
        seg = self._segs[n] = _Segment(n, path, fd, 1, 0)
        return seg

    async def _grow(self, seg: _Segment, upto: int) -> None:
        async with seg.lock:
            if seg.zeroed >= upto:
                return
            target = min(max(upto, seg.zeroed + _GROW), max(SEGMENT_MAX, upto))
            seg.zeroed = await trio.to_thread.run_sync(self._zero_fill, seg.fd, seg.zeroed, target, upto)

    async def _grow_ahead(self, seg: _Segment) -> None:
        try:
            await self._grow(seg, min(seg.end + _GROW, SEGMENT_MAX))
        except OSError:
            pass  # no room now: the next stage grows what it needs, or falls back to uploading

    def _zero_fill(self, fd: int, start: int, target: int, need: int) -> int:
        """Zero-fill [start, target) of a segment (less if the disk's reserve
        would be touched, but at least up to `need`) and sync it."""
        st = os.statvfs(self.root)
        room = st.f_bavail * st.f_frsize - int(self.free_ratio * st.f_blocks * st.f_frsize)
        target = min(target, start + max(room, 0) // _ALIGN * _ALIGN)
        if target < need:
            raise OSError(errno.ENOSPC, f"less than {self.free_ratio:.0%} of the disk would stay free")
        zeros = bytes(1 << 20)
        pos = start
        while pos < target:
            pos += os.pwrite(fd, memoryview(zeros)[:min(len(zeros), target - pos)], pos)
        os.fsync(fd)
        return target

    # ---- staging and reading ----------------------------------------------
    async def stage(self, key: str, data) -> bool:
        """Keep the block durably until it is uploaded; False if there is no
        room (the caller then uploads synchronously or fails)."""
        kb = key.encode()
        try:
            seg, off = await self._room(_record_len(len(kb), len(data)))
            try:
                await trio.to_thread.run_sync(_write_record, seg.fd, off, seg.gen, kb, data)
            except BaseException:
                self._release(seg)
                raise
        except OSError as e:
            if not self._full_warned or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cannot stage block %s in %s: %s", key, self.root, e)
            self._full_warned = e.errno in (errno.ENOSPC, errno.EDQUOT)
            return False
        self._full_warned = False
        now = self._last_stage = time.monotonic()
        self._add(key, _Entry(seg, off, len(data), staged=now, due=now + self.upload_delay))
        return True

    async def get(self, key: str) -> bytes | None:
        """A staged block's bytes (verified), or None if it is not staged."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            return await self._read(key, entry)
        except FileNotFoundError:
            return None  # uploaded (and removed) meanwhile: the store has it

    async def _read(self, key: str, entry: _Entry) -> bytes:
        self._readers += 1
        try:
            return await trio.to_thread.run_sync(_read, key, entry)
        finally:
            self._readers -= 1
            self._trim()

    # ---- uploading --------------------------------------------------------
    async def _uploader(self) -> None:
        async with trio.open_nursery() as n:
            while True:
                now = time.monotonic()
                wait = max(self._retry_at - now, self._held(now))
                key = None
                if wait <= 0:
                    key, wait = self._next_due(now)
                if key is None:
                    with trio.move_on_after(wait if wait > 0 else math.inf):
                        await self._wakeup.wait()  # new keys, a finished upload, the drain
                    self._wakeup = trio.Event()
                    continue
                await self._limit.acquire()  # at most `uploads` at once
                if self._retry_at > time.monotonic():
                    self._limit.release()
                    continue  # an upload just failed: back off before the rest
                self._uploading.add(key)
                n.start_soon(self._upload, key)

    def _held(self, now: float) -> float:
        """Seconds that write-back still holds every upload back (see QUIET)."""
        if not self.hold or self._draining or self.bytes >= HOLD_BYTES or not self._entries:
            return 0.0
        oldest = next(iter(self._entries.values()))
        return min(oldest.staged + self.hold, self._last_stage + QUIET) - now

    def _next_due(self, now: float) -> tuple[str | None, float]:
        """The oldest staged block that may be uploaded now, or None and the
        seconds until one may (0: none is waiting)."""
        for key, entry in self._entries.items():
            if key in self._uploading:
                continue
            if self._draining or entry.due <= now:
                return key, 0.0
            return None, entry.due - now  # in staging order: the later ones are due later
        return None, 0.0

    async def _upload(self, key: str) -> None:
        entry = self._entries[key]
        try:
            try:
                data = self.source(key) if self.source is not None else None
                if data is None or len(data) != entry.size:
                    data = await self._read(key, entry)
            except OSError as e:
                log.error("staged block %s cannot be uploaded, and is lost: %s", key, e)
                self._forget(key)
                return
            t = time.perf_counter()
            try:
                await self.storage.put(key, data)
            except StorageError as e:
                self.metrics.s3_failed("put", time.perf_counter() - t)
                self._failures += 1
                wait = min(_MAX_BACKOFF, 0.5 * 2 ** min(self._failures, 8))
                self._retry_at = time.monotonic() + wait * (0.5 + random.random() / 2)
                if self._failures == 1:
                    log.warning("uploading staged blocks failed (%s); %d blocks wait in %s, retrying",
                                e, len(self.pending), self.root)
                return
            self.metrics.s3("put", len(data), time.perf_counter() - t)
            if self._failures:
                log.info("the object store takes uploads again; %d staged blocks left", len(self.pending) - 1)
            self._failures = 0
            if entry.path is None:
                os.pwrite(entry.seg.fd, DONE, entry.off)  # 4 bytes into the page cache: no thread
            else:
                await trio.to_thread.run_sync(_unlink_quietly, entry.path)
            self.uploaded += 1
            self._forget(key)
            if self.on_uploaded is not None:
                self.on_uploaded(key, data)
        finally:
            self._uploading.discard(key)
            self._limit.release()
            self._wakeup.set()

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        self.bytes -= self.pending.pop(key, 0)
        if entry is not None and entry.seg is not None:
            self._release(entry.seg)
        if not self.pending:
            self._drained.set()

    def _release(self, seg: _Segment) -> None:
        seg.live -= 1
        if seg.live:
            return
        if seg is self._active:
            seg.gen, seg.end = seg.gen + 1, 0  # start over at the front: the file stays small
        self._trim()

    def _trim(self) -> None:
        """Keep one drained segment for reuse; give the others' space back
        (after an outage's worth of staging)."""
        if self._readers:
            return  # a read thread may still use a segment's descriptor
        spare = [s for s in self._segs.values()
                 if s.live == 0 and s is not self._active and not s.lock.locked()]  # (locked: being grown)
        for s in spare[1:]:
            del self._segs[s.n]
            os.close(s.fd)
            _unlink_quietly(s.path)


def _create(path: str, root: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # its directory entry
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return fd


def _write_record(fd: int, off: int, gen: int, key: bytes, data) -> None:
    head = _HEAD.pack(MAGIC, gen, len(data), len(key))
    parts = [head, key, data, _SUM.pack(_checksum(head, key, data))]
    want = sum(len(memoryview(p).cast("B")) for p in parts)
    if os.pwritev(fd, parts, off) != want:
        raise OSError(errno.EIO, "short write to a staging segment")
    os.fdatasync(fd)


def _read(key: str, entry: _Entry) -> bytes:
    if entry.path is not None:
        with open(entry.path, "rb") as f:
            raw = f.read()
        data, tail = raw[:-_SUM.size], raw[-_SUM.size:]
        if len(raw) < _SUM.size or _SUM.unpack(tail)[0] != xxhash.xxh64_intdigest(data):
            raise OSError(errno.EIO, f"staged block {entry.path} is damaged")
        return data
    kb = key.encode()
    raw = os.pread(entry.seg.fd, _record_len(len(kb), entry.size), entry.off)
    got = _parse(raw, 0)
    if got is None or got[2] != key:
        raise OSError(errno.EIO, f"staged block {key} at {entry.seg.path}:{entry.off} is damaged")
    return raw[got[4]:got[4] + entry.size]


def _parse(buf, off: int):
    """(magic, generation, key, length, data offset) of a valid record at off, or None."""
    if off + _HEAD.size > len(buf):
        return None
    magic, gen, dlen, klen = _HEAD.unpack_from(buf, off)
    if magic not in (MAGIC, DONE):
        return None
    start = off + _HEAD.size + klen
    end = start + dlen
    if end + _SUM.size > len(buf):
        return None
    key = bytes(buf[off + _HEAD.size:start])
    if _SUM.unpack_from(buf, end)[0] != _checksum(bytes(buf[off:off + _HEAD.size]), key, buf[start:end]):
        return None
    return magic, gen, key.decode(errors="replace"), dlen, start


def _scan_segment(fd: int) -> list[tuple[int, int, str, int, bool]]:
    """(generation, offset, key, length, uploaded) of every valid record.
    Every aligned offset is tried: a record torn by a crash (never
    acknowledged) must not hide the ones after it."""
    size = os.fstat(fd).st_size
    if size == 0:
        return []
    out = []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as buf:
        off = 0
        while off + _HEAD.size <= size:
            got = _parse(buf, off) if buf[off:off + 4] in (MAGIC, DONE) else None
            if got is None:
                off += _ALIGN
                continue
            magic, gen, key, dlen, start = got
            out.append((gen, off, key, dlen, magic == DONE))
            off += _record_len(start - off - _HEAD.size, dlen)
    return out


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
