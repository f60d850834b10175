"""The tiered block cache facade: memory → disk → (cache group) → object store.

Blocks are immutable and named by key, so a cached block is never stale and
the tiers need no invalidation, only eviction. Concurrent misses for one key
share a single fetch.
"""
from __future__ import annotations

import errno
import logging
import time
from typing import Awaitable, Callable

import trio

from ..metrics import Metrics
from ..storage import AccessDenied, NoSuchBucket, NotFound, StorageError
from .memory import MemoryCache

log = logging.getLogger("jfscache.cache")


class MissingBlock(OSError):
    """The object store does not have a block a slice list names (EIO if it
    reaches the application: the list was stale, or the data is lost)."""

    def __init__(self, key: str):
        super().__init__(errno.EIO, f"block {key} is missing from the object store")


class _Flight:
    """One fetch in progress, shared by every reader of that block."""
    __slots__ = ("done", "data")

    def __init__(self):
        self.done = trio.Event()
        self.data: bytes | None = None


class BlockCache:
    def __init__(self, storage, mem_bytes: int, disk=None, max_prefetch: int = 8, metrics: Metrics | None = None):
        self.storage = storage
        self.metrics = metrics if metrics is not None else Metrics()
        self.mem = MemoryCache(mem_bytes)
        self.disk = disk
        # Blocks written but not yet uploaded (cache/staging.py), if the node
        # has a cache disk; with `writeback` every new block is staged first.
        self.staging = None
        self.writeback = False
        # Where a miss goes after the local tiers: (bytes, keep on disk).
        # A cache group replaces it with "ask the owner, fall back to the
        # store"; a block this node does not own stays in memory only.
        self.remote: Callable[[str], Awaitable[tuple[bytes, bool]]] = self._from_storage_owned
        self._inflight: dict[str, _Flight] = {}
        self._queued: set[str] = set()  # prefetches waiting for the limiter
        self._prefetch_limit = trio.CapacityLimiter(max_prefetch)
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def from_storage(self, key: str) -> bytes:
        t = time.perf_counter()
        try:
            data = await self.storage.get(key)
        except StorageError as e:
            self.metrics.s3_failed("get", time.perf_counter() - t)
            if isinstance(e, NotFound):
                raise MissingBlock(key) from None
            raise
        self.metrics.s3("get", len(data), time.perf_counter() - t)
        return data

    async def _from_storage_owned(self, key: str) -> tuple[bytes, bool]:
        return await self.from_storage(key), True

    # ---- what a cache group's peers are served from ------------------------
    async def local(self, key: str) -> bytes | None:
        """The block from this node's own tiers, or None; never fetches."""
        data = self.mem.get(key)
        if data is None and self.disk is not None:
            data = await self.disk.get(key)
        return data

    def contains(self, key: str) -> bool:
        return key in self.mem or (self.disk is not None and self.disk.has(key))

    def evict(self, key: str) -> None:
        """Forget a block locally (it stays in the object store)."""
        self.mem.drop(key)
        if self.disk is not None:
            self.disk.drop(key)

    async def warm(self, key: str, fetch: Callable[[str], Awaitable[bytes]] | None = None) -> bytes:
        """get(), then make sure the block is on the disk tier, waiting for
        room in its write queue rather than dropping it: a warmup that said
        "cached" must mean cached on disk."""
        data = await self.get(key, fetch)
        if self.disk is not None:
            await self.disk.add_wait(key, data)
        return data

    def cached_bytes(self) -> int:
        return self.mem.used + (self.disk.used if self.disk is not None else 0)

    async def get(self, key: str, fetch: Callable[[str], Awaitable[bytes]] | None = None) -> bytes:
        """The whole block. `fetch` replaces the remote tiers for this miss
        (an owner serving a peer fetches from the store, never from peers)."""
        data = self.mem.get(key)
        if data is not None:
            self.metrics.hit("mem", len(data))
            return data
        self.metrics.miss("mem")
        flight = self._inflight.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            # The shared fetch failed or was cancelled: try on our own.
            return await self.get(key, fetch)
        flight = self._inflight[key] = _Flight()
        try:
            flight.data = await self._load(key, fetch)
            return flight.data
        finally:
            del self._inflight[key]
            flight.done.set()

    async def read(self, key: str, off: int, length: int, size: int):
        """Bytes [off, off+length) of a block of `size` bytes. A part of a block
        that only the disk tier has is read (and verified) alone, without
        loading the block: random reads stay cheap and leave memory alone."""
        data = self.mem.get(key)
        if data is None and length < size and self.disk is not None and key not in self._inflight:
            part = await self.disk.get(key, off, length)
            if part is not None:
                self.metrics.miss("mem")  # (a miss that goes on to get() is counted there)
                self.metrics.hit("disk", len(part))
                return part
        if data is None:
            data = await self.get(key)
        else:
            self.metrics.hit("mem", length)
        return memoryview(data)[off:off + length]

    async def _load(self, key: str, fetch) -> bytes:
        for tier, name in ((self.disk, "disk"), (self.staging, "staging")):
            if tier is None:
                continue
            data = await tier.get(key)
            if data is not None:
                self.metrics.hit(name, len(data))
                self.mem.put(key, data)
                return data
            self.metrics.miss(name)
        self.metrics.local_misses += 1
        if fetch is not None:
            data, keep = await fetch(key), True
        else:
            data, keep = await self.remote(key)
        self.mem.put(key, data)
        if keep and self.disk is not None:
            await self.disk.add_owned(key, data)
        return data

    def prefetch(self, key: str) -> None:
        """Fetch a block in the background unless it is cached or on its way."""
        # Blocks on disk are prefetched too: whole-block reads on worker
        # threads, ahead of the reader, beat the kernel's one or two
        # outstanding 1 MiB requests served one at a time.
        if key in self.mem or key in self._inflight or key in self._queued or self._nursery is None:
            return
        self._queued.add(key)
        self._nursery.start_soon(self._prefetch, key)

    async def _prefetch(self, key: str) -> None:
        try:
            async with self._prefetch_limit:
                await self.get(key)
                self.metrics.prefetched += 1
        except Exception as e:  # a failed prefetch is only a lost hint; the read retries
            log.debug("prefetch of %s failed: %s", key, e)
        finally:
            self._queued.discard(key)

    async def put(self, key: str, data: bytes) -> None:
        """Store a new block, then keep it cached so that it reads back without
        the store. When the store does not take it (after its bounded retries),
        or at once with write-back, the block is staged on the local disk and
        uploaded later; a write fails only if it cannot be staged either."""
        staged = self.writeback and self.staging is not None and await self.staging.stage(key, data)
        if not staged:
            t = time.perf_counter()
            try:
                await self.storage.put(key, data)
            except (AccessDenied, NoSuchBucket):
                self.metrics.s3_failed("put", time.perf_counter() - t)
                raise  # a setup error: staging would only hide it
            except StorageError as e:
                self.metrics.s3_failed("put", time.perf_counter() - t)
                if self.staging is None or not await self.staging.stage(key, data):
                    raise
                log.warning("staged block %s locally, to be uploaded later: %s", key, e)
                staged = True
            else:
                self.metrics.s3("put", len(data), time.perf_counter() - t)
        if staged:
            self.metrics.staged += 1
        self.mem.put(key, data)
        if self.disk is not None and not staged:  # a staged block reaches the disk tier once uploaded
            self.disk.add(key, data)

    def uploaded(self, key: str, data: bytes) -> None:
        """A staged block reached the store: keep it in the disk tier."""
        self.metrics.staged_uploaded += 1
        if self.disk is not None:
            self.disk.add(key, data)

    async def remove(self, keys: list[str]) -> None:
        """Forget blocks everywhere and delete them from the store (in
        batches: storage.delete_many)."""
        for key in keys:
            self.mem.drop(key)
            if self.disk is not None:
                self.disk.drop(key)
        if not keys:
            return
        t = time.perf_counter()
        try:
            await self.storage.delete_many(keys)
        except StorageError:
            self.metrics.s3_failed("delete", time.perf_counter() - t)
            raise
        self.metrics.s3("delete", 0, time.perf_counter() - t)


class LocalWarmer:
    """Warmup on a node outside any cache group: blocks go into its own tiers."""

    def __init__(self, cache: BlockCache):
        self.cache = cache

    async def warm(self, key: str) -> bool:
        cached = self.cache.contains(key)
        await self.cache.warm(key)
        return cached

    async def check(self, keys: list[str]) -> list[tuple[str, bool]]:
        return [("local", self.cache.contains(k)) for k in keys]

    async def evict(self, keys: list[str]) -> int:
        n = 0
        for k in keys:
            n += self.cache.contains(k)
            self.cache.evict(k)
        return n
