"""The disk tier: block files on local NVMe with an LMDB index.

- Block files are written atomically (tmp file + rename), 0600 under 0700 dirs.
- The index maps key → (size, xxhash64, last access). It is loaded at start
  and checked against the files: entries without a file (or of the wrong
  size) are dropped, files without an entry are removed.
- Every read is verified against the stored xxhash64 of each 64 KiB piece it
  touches (so a 4 KiB random read costs a 64 KiB read, not a 4 MiB one); a
  corrupt block is dropped and reported as a miss, so the caller refetches
  it. Bad bytes are never returned.
- Eviction is least recently used, keeping each directory under its share of
  --cache-size and its filesystem above --free-space-ratio free.
- Writes are write-behind through a bounded queue: the cache is best effort,
  so when the disk is slow, full or read-only the block is simply not cached
  (one warning per cause), and reads carry on from the next tier. A block
  that came from the object store waits a moment for room in the queue
  first (add_owned): dropping it means the store serves it again.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections import OrderedDict, deque

import lmdb
import trio
import xxhash

from ..fsutil import Busy, hold_lock, write_atomic
from ..metrics import Metrics

log = logging.getLogger("jfscache.cache.disk")

# Index value: size, last access (unix seconds), then one xxh64 per PIECE of
# the block, so that a small read verifies (and reads) only the pieces it
# touches instead of the whole 4 MiB block.
_HEAD = struct.Struct(">Qd")
PIECE = 64 << 10
_QUEUE_LIMIT = 64 << 20  # bytes waiting to be written before adds are dropped (they count in RSS)
# How long a block fetched from the store may wait for room in the queue.
# Seen before it existed: a cold read at ~700 MB/s outran the writer (its
# hashing shares 2 cores with the S3 client) and 4-8 % of the file was not
# cached on disk. A disk that stays slower than this still drops blocks.
_ROOM_WAIT = 2.0
_ACCESS_FLUSH = 10.0  # seconds between writes of last-access times to the index
# Smaller reads run on the event loop: a thread hand-off costs more than
# reading them from the page cache or NVMe (measured: 64 KiB files read by 4
# readers, 3.4k files/s inline vs 2.3k through threads).
_INLINE_READ = 256 << 10


class CacheDirError(ValueError):
    """A cache dir cannot be used at start (one line, for the CLI)."""


class _Dir:
    def __init__(self, path: str, capacity: int):
        self.path = path
        self.blocks = os.path.join(path, "blocks")
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[str, int] = OrderedDict()  # LRU order: key -> size
        self.env: lmdb.Environment | None = None
        self.touched: dict[str, float] = {}
        self.broken_until = 0.0  # writes paused until then after an I/O failure
        self.lock = -1  # fd holding the dir's lock while this process uses it

    def file(self, key: str) -> str:
        return os.path.join(self.blocks, key)


class DiskCache:
    def __init__(self, dirs: list[str], capacity: int, free_ratio: float = 0.1, metrics: Metrics | None = None):
        self.free_ratio = free_ratio
        self.metrics = metrics if metrics is not None else Metrics()
        self.dirs = [_Dir(os.path.abspath(d), capacity // len(dirs)) for d in dirs]
        self._queue: deque[tuple[_Dir, str, bytes]] = deque()
        self._queued = 0
        self._wakeup = trio.Event()
        self._dequeued = trio.lowlevel.ParkingLot()  # woken each time the writer takes a block off
        self._warned: set[str] = set()

    # ---- lifecycle --------------------------------------------------------
    async def open(self, owner: str = "") -> None:
        """Open every cache dir. One that another daemon uses is an error
        (Busy): two daemons evicting each other's files under one index
        would corrupt it. One that cannot be used (read-only, not a
        directory, no permission) is an error too: the mount would run
        without the cache it was asked for. (Failures later, while mounted,
        only cost the cache, see _write_failed.)"""
        for d in self.dirs:
            try:
                await trio.to_thread.run_sync(self._open_dir, d, owner or f"pid {os.getpid()}")
            except (OSError, lmdb.Error) as e:
                self.close()
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise CacheDirError(f"cache dir {d.path} is unusable: {msg} (choose another --cache-dir, "
                                    "or --cache-size 0 for no disk cache)") from None
            except Busy:
                self.close()
                raise

    def _open_dir(self, d: _Dir, owner: str) -> None:
        os.makedirs(d.blocks, mode=0o700, exist_ok=True)
        os.chmod(d.path, 0o700)
        d.lock = hold_lock(os.path.join(d.path, ".lock"), f"cache dir {d.path}", owner)
        os.makedirs(os.path.join(d.path, "index.lmdb"), mode=0o700, exist_ok=True)
        d.env = lmdb.open(os.path.join(d.path, "index.lmdb"), map_size=1 << 32, subdir=True,
                          sync=False, metasync=False, max_dbs=0, mode=0o600)
        rows = []
        with d.env.begin() as txn:
            for k, v in txn.cursor():
                size, atime = _HEAD.unpack_from(v)
                rows.append((atime, k.decode(), size))
        on_disk = {}
        for root, _, files in os.walk(d.blocks):
            for name in files:
                p = os.path.join(root, name)
                if name.endswith(".tmp"):
                    os.unlink(p)  # a write that a crash interrupted
                    continue
                on_disk[os.path.relpath(p, d.blocks)] = os.stat(p).st_size
        stale = []
        for atime, key, size in sorted(rows):
            if on_disk.pop(key, None) == size:
                d.entries[key] = size
                d.used += size
            else:
                stale.append(key)
        with d.env.begin(write=True) as txn:
            for key in stale:
                txn.delete(key.encode())
        for rel in on_disk:  # files the index does not know cannot be verified
            os.unlink(os.path.join(d.blocks, rel))
        if stale or on_disk:
            log.info("cache dir %s: dropped %d index entries without a file and %d files without an entry",
                     d.path, len(stale), len(on_disk))
        log.info("cache dir %s: %d blocks, %.1f MiB", d.path, len(d.entries), d.used / 2**20)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._writer)
        nursery.start_soon(self._access_flusher)

    async def drain(self, timeout: float = 30) -> None:
        """Wait (bounded) until queued blocks are on disk, e.g. before unmount."""
        with trio.move_on_after(timeout):
            while self._queue:
                await self._dequeued.park()

    def close(self) -> None:
        for d in self.dirs:
            self._flush_access(d)
            if d.env is not None:
                d.env.sync(True)
                d.env.close()
                d.env = None
            if d.lock >= 0:
                os.close(d.lock)
                d.lock = -1

    # ---- lookups ----------------------------------------------------------
    def _dir(self, key: str) -> _Dir | None:
        if not self.dirs:
            return None
        return self.dirs[xxhash.xxh32_intdigest(key.encode()) % len(self.dirs)]

    def has(self, key: str) -> bool:
        d = self._dir(key)
        return d is not None and key in d.entries

    @property
    def used(self) -> int:
        return sum(d.used for d in self.dirs)

    async def get(self, key: str, off: int = 0, length: int = -1) -> bytes | None:
        """The block's bytes [off, off+length) (all of it by default), verified;
        None if it is not cached or fails verification (then it is dropped)."""
        d = self._dir(key)
        if d is None:
            return None
        size = d.entries.get(key)
        if size is None:
            return None
        d.entries.move_to_end(key)
        d.touched[key] = time.time()
        with d.env.begin() as txn:
            raw = txn.get(key.encode())
        end = size if length < 0 else min(size, off + length)
        try:
            if raw is None:
                data = None
            elif end - off <= _INLINE_READ:
                data = _read_verified(d.file(key), size, raw, off, end)
            else:
                data = await trio.to_thread.run_sync(_read_verified, d.file(key), size, raw, off, end)
        except OSError as e:
            log.warning("reading cached block %s failed: %s; fetching it again", key, e)
            data = None
        if data is None:
            self.metrics.disk_corrupt += 1
            log.warning("cached block %s is corrupt or missing; dropped, fetching it again", key)
            self.drop(key)
        return data

    # ---- writes -----------------------------------------------------------
    def add(self, key: str, data: bytes) -> None:
        """Queue a block to be cached; never blocks, may decline."""
        d = self._dir(key)
        if d is None or key in d.entries or time.monotonic() < d.broken_until:
            return
        if self._queued + len(data) > _QUEUE_LIMIT:
            self.metrics.disk_dropped += 1
            return
        self._queue.append((d, key, data))
        self._queued += len(data)
        self._wakeup.set()

    async def add_owned(self, key: str, data: bytes) -> None:
        """add() for a block fetched from the object store: wait up to
        _ROOM_WAIT seconds for room in the queue before declining."""
        with trio.move_on_after(_ROOM_WAIT):
            await self._room_for(len(data))
        self.add(key, data)

    async def add_wait(self, key: str, data: bytes) -> None:
        """Cache a block on disk and wait until it is written (or the write
        failed): for warmup, where "cached" must mean on disk. Waits for room
        in the queue instead of declining."""
        await self._room_for(len(data))
        self.add(key, data)
        while any(k == key for _, k, _ in self._queue):
            await self._dequeued.park()

    async def _room_for(self, size: int) -> None:
        while self._queued + size > _QUEUE_LIMIT and self._queue:
            await self._dequeued.park()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                d, key, data = self._queue[0]
                if key in d.entries or time.monotonic() < d.broken_until:
                    self._queue.popleft()
                    self._queued -= len(data)
                    self._dequeued.unpark_all()
                    continue
                try:
                    self._make_room(d, len(data))
                    hashes = await trio.to_thread.run_sync(_write_file, d.file(key), data)
                except OSError as e:
                    self._write_failed(d, e)
                else:
                    # Index updates stay on the trio thread: no locking needed.
                    with d.env.begin(write=True) as txn:
                        txn.put(key.encode(), _HEAD.pack(len(data), time.time()) + hashes)
                    d.entries[key] = len(data)
                    d.used += len(data)
                    self.metrics.disk_writes += 1
                    self.metrics.disk_write_bytes += len(data)
                finally:
                    # Dequeued only now, so that drain() also waits for this write.
                    self._queue.popleft()
                    self._queued -= len(data)
                    self._dequeued.unpark_all()

    def _write_failed(self, d: _Dir, e: OSError) -> None:
        cause = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EACCES: "not writable",
                 errno.EPERM: "not writable", errno.EROFS: "read-only"}.get(e.errno, "failing")
        # Pause writes for a while rather than retrying each block.
        d.broken_until = time.monotonic() + 30
        self.metrics.disk_write_errors += 1
        self._warn(f"{d.path}:{cause}", f"cache dir {d.path} is {cause} ({e.strerror or e}); "
                   "blocks are served without caching them on disk")

    def _warn(self, cause: str, msg: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning(msg)

    def _make_room(self, d: _Dir, need: int) -> None:
        """Evict least recently used blocks until `need` more bytes fit."""
        def over() -> bool:
            if d.used + need > d.capacity:
                return True
            st = os.statvfs(d.path)
            return (st.f_bavail * st.f_frsize - need) < self.free_ratio * st.f_blocks * st.f_frsize
        victims = []
        while d.entries and over():
            key, size = d.entries.popitem(last=False)
            d.used -= size
            victims.append(key)
            try:
                os.unlink(d.file(key))
            except FileNotFoundError:
                pass
        if victims:
            self.metrics.disk_evictions += len(victims)
            with d.env.begin(write=True) as txn:
                for key in victims:
                    txn.delete(key.encode())

    def drop(self, key: str) -> None:
        d = self._dir(key)
        if d is None:
            return
        size = d.entries.pop(key, None)
        if size is None:
            return
        d.used -= size
        d.touched.pop(key, None)
        try:
            os.unlink(d.file(key))
        except OSError:
            pass
        with d.env.begin(write=True) as txn:
            txn.delete(key.encode())

    # ---- last access ------------------------------------------------------
    async def _access_flusher(self) -> None:
        while True:
            await trio.sleep(_ACCESS_FLUSH)
            for d in self.dirs:
                self._flush_access(d)

    def _flush_access(self, d: _Dir) -> None:
        if not d.touched or d.env is None:
            return
        touched, d.touched = d.touched, {}
        with d.env.begin(write=True) as txn:
            for key, t in touched.items():
                raw = txn.get(key.encode()) if key in d.entries else None
                if raw is not None:
                    txn.put(key.encode(), _HEAD.pack(_HEAD.unpack_from(raw)[0], t) + raw[_HEAD.size:])


def _piece_hashes(data) -> bytes:
    mv = memoryview(data)
    return b"".join(xxhash.xxh64_digest(mv[i:i + PIECE]) for i in range(0, len(mv), PIECE))


def _write_file(path: str, data) -> bytes:
    """Write a block atomically; returns its packed piece hashes. No fsync: a
    block torn by a power cut fails verification when read, and is refetched."""
    hashes = _piece_hashes(data)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, f"{path}.{os.getpid()}.tmp", data, fsync=False)
    return hashes


def _read_verified(path: str, size: int, index_value: bytes, off: int, end: int) -> bytes | None:
    """Bytes [off, end) of a cached block, reading and checking only the pieces
    they lie in; None if the file or any of those pieces is not as indexed."""
    hashes = memoryview(index_value)[_HEAD.size:]
    if len(hashes) != 8 * ((size + PIECE - 1) // PIECE):
        return None
    first, last = off // PIECE, max(off, end - 1) // PIECE
    start = first * PIECE
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != size:
            return None
        data = os.pread(f.fileno(), min(size, (last + 1) * PIECE) - start, start)
    mv = memoryview(data)
    for i in range(first, last + 1):
        if xxhash.xxh64_digest(mv[(i - first) * PIECE:(i - first + 1) * PIECE]) != hashes[8 * i:8 * i + 8]:
            return None
    if off == start and end - start == len(data):
        return data
    return data[off - start:end - start]
