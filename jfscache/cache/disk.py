"""The disk tier: block files on local NVMe with an LMDB index.

- Block files are written atomically (tmp file + rename), 0600 under 0700 dirs.
- The index maps key → (size, xxhash64, last access). It is loaded at start
  and checked against the files: entries without a file (or of the wrong
  size) are dropped, files without an entry are removed.
- Every read is verified against the stored xxhash64; a corrupt block is
  dropped and reported as a miss, so the caller refetches it. Bad bytes are
  never returned.
- Eviction is least recently used, keeping each directory under its share of
  --cache-size and its filesystem above --free-space-ratio free.
- Writes are write-behind through a bounded queue: the cache is best effort,
  so when the disk is slow, full or read-only the block is simply not cached
  (one warning per cause), and reads carry on from the next tier.
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

from .stats import STATS

log = logging.getLogger("jfscache.cache.disk")

_ENTRY = struct.Struct(">QQd")  # size, xxh64, last access (unix seconds)
_QUEUE_LIMIT = 256 << 20  # bytes waiting to be written before adds are dropped
_ACCESS_FLUSH = 10.0
# Smaller blocks are read on the event loop: a thread hand-off costs more
# than reading them from the page cache or NVMe.
_INLINE_READ = 256 << 10  # seconds between writes of last-access times to the index


class _Dir:
    def __init__(self, path: str, capacity: int):
        self.path = path
        self.blocks = os.path.join(path, "blocks")
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[str, tuple[int, int]] = OrderedDict()  # LRU order: key -> (size, hash)
        self.env: lmdb.Environment | None = None
        self.touched: dict[str, float] = {}
        self.broken_until = 0.0  # writes paused until then after an I/O failure

    def file(self, key: str) -> str:
        return os.path.join(self.blocks, key)


class DiskCache:
    def __init__(self, dirs: list[str], capacity: int, free_ratio: float = 0.1):
        self.free_ratio = free_ratio
        self.dirs = [_Dir(os.path.abspath(d), capacity // len(dirs)) for d in dirs]
        self._queue: deque[tuple[_Dir, str, bytes]] = deque()
        self._queued = 0
        self._wakeup = trio.Event()
        self._warned: set[str] = set()

    # ---- lifecycle --------------------------------------------------------
    async def open(self) -> None:
        usable = []
        for d in self.dirs:
            try:
                await trio.to_thread.run_sync(self._open_dir, d)
                usable.append(d)
            except (OSError, lmdb.Error) as e:
                self._warn("open", f"cache dir {d.path} is unusable ({e}); reading without it")
        self.dirs = usable

    def _open_dir(self, d: _Dir) -> None:
        os.makedirs(d.blocks, mode=0o700, exist_ok=True)
        os.chmod(d.path, 0o700)
        os.makedirs(os.path.join(d.path, "index.lmdb"), mode=0o700, exist_ok=True)
        d.env = lmdb.open(os.path.join(d.path, "index.lmdb"), map_size=1 << 32, subdir=True,
                          sync=False, metasync=False, max_dbs=0, mode=0o600)
        rows = []
        with d.env.begin() as txn:
            for k, v in txn.cursor():
                size, h, atime = _ENTRY.unpack(v)
                rows.append((atime, k.decode(), size, h))
        on_disk = {}
        for root, _, files in os.walk(d.blocks):
            for name in files:
                p = os.path.join(root, name)
                if name.endswith(".tmp"):
                    os.unlink(p)  # a write that a crash interrupted
                    continue
                on_disk[os.path.relpath(p, d.blocks)] = os.stat(p).st_size
        stale = []
        for atime, key, size, h in sorted(rows):
            if on_disk.pop(key, None) == size:
                d.entries[key] = (size, h)
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
                await trio.sleep(0.01)

    def close(self) -> None:
        for d in self.dirs:
            self._flush_access(d)
            if d.env is not None:
                d.env.sync(True)
                d.env.close()
                d.env = None

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

    async def get(self, key: str) -> bytes | None:
        d = self._dir(key)
        if d is None:
            return None
        ent = d.entries.get(key)
        if ent is None:
            return None
        d.entries.move_to_end(key)
        d.touched[key] = time.time()
        size, h = ent
        try:
            if size <= _INLINE_READ:
                data = _read_verified(d.file(key), size, h)
            else:
                data = await trio.to_thread.run_sync(_read_verified, d.file(key), size, h)
        except OSError as e:
            log.warning("reading cached block %s failed: %s; fetching it again", key, e)
            data = None
        if data is None:
            STATS.add("disk_corrupt")
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
            STATS.add("disk_add_dropped")
            return
        self._queue.append((d, key, data))
        self._queued += len(data)
        self._wakeup.set()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queue:
                d, key, data = self._queue[0]
                if key in d.entries or time.monotonic() < d.broken_until:
                    self._queue.popleft()
                    self._queued -= len(data)
                    continue
                try:
                    self._make_room(d, len(data))
                    h = await trio.to_thread.run_sync(_write_file, d.file(key), data)
                except OSError as e:
                    self._write_failed(d, e)
                else:
                    # Index updates stay on the trio thread: no locking needed.
                    with d.env.begin(write=True) as txn:
                        txn.put(key.encode(), _ENTRY.pack(len(data), h, time.time()))
                    d.entries[key] = (len(data), h)
                    d.used += len(data)
                    STATS.add("disk_writes")
                    STATS.add("disk_write_bytes", len(data))
                finally:
                    # Dequeued only now, so that drain() also waits for this write.
                    self._queue.popleft()
                    self._queued -= len(data)

    def _write_failed(self, d: _Dir, e: OSError) -> None:
        cause = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EACCES: "not writable",
                 errno.EPERM: "not writable", errno.EROFS: "read-only"}.get(e.errno, "failing")
        # Pause writes for a while rather than retrying each block.
        d.broken_until = time.monotonic() + 30
        STATS.add("disk_write_errors")
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
            key, (size, _) = d.entries.popitem(last=False)
            d.used -= size
            victims.append(key)
            try:
                os.unlink(d.file(key))
            except FileNotFoundError:
                pass
        if victims:
            STATS.add("disk_evictions", len(victims))
            with d.env.begin(write=True) as txn:
                for key in victims:
                    txn.delete(key.encode())

    def drop(self, key: str) -> None:
        d = self._dir(key)
        if d is None:
            return
        ent = d.entries.pop(key, None)
        if ent is None:
            return
        d.used -= ent[0]
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
                ent = d.entries.get(key)
                if ent is not None:
                    txn.put(key.encode(), _ENTRY.pack(ent[0], ent[1], t))


def _write_file(path: str, data: bytes) -> int:
    """Write a block atomically; returns its xxhash64."""
    h = xxhash.xxh64_intdigest(data)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return h


def _read_verified(path: str, size: int, h: int) -> bytes | None:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != size or xxhash.xxh64_intdigest(data) != h:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return data
