"""Staged blocks: written, durable on the local cache disk, not yet in the store.

A block goes here instead of failing the write when the object store does
not take it within --io-timeout (and, with --writeback, before any upload
is tried). Staging writes the block to a file in <cache dir>/staging/ and fsyncs
it (and its directory) before it returns, so an fsync that succeeded
survives a crash or a reboot of this node. A background uploader puts the
staged blocks into the store, backing off while it is down, and deletes
each file once its upload succeeded. Staged blocks left by an earlier
daemon with the same cache dir are found and uploaded at start.

Each file ends with the xxhash64 of its bytes: a staged block that the disk
damaged is reported (and kept, renamed *.corrupt) rather than uploaded.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import struct
import time
from typing import Callable

import trio
import xxhash

from ..metrics import Metrics
from ..storage import StorageError

log = logging.getLogger("jfscache.cache.staging")

_SUM = struct.Struct(">Q")
_MAX_BACKOFF = 30.0


class Staging:
    def __init__(self, cache_dir: str, volume: str, storage, *, free_ratio: float = 0.1,
                 uploads: int = 4, on_uploaded: Callable[[str, bytes], None] | None = None,
                 metrics: Metrics | None = None):
        self.root = os.path.join(os.path.abspath(cache_dir), "staging")
        self.volume = volume
        self.storage = storage
        self.free_ratio = free_ratio
        self.on_uploaded = on_uploaded  # e.g. keep the block in the disk tier
        self.metrics = metrics if metrics is not None else Metrics()  # uploads are object-store puts
        self.pending: dict[str, int] = {}  # key -> size, in staging order
        self._uploading: set[str] = set()
        self._limit = trio.Semaphore(max(1, uploads))  # released by the upload task, not the one that took it
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._failures = 0  # consecutive failed uploads: the back-off grows with them
        self._retry_at = 0.0
        self._full_warned = False
        self.uploaded = 0  # blocks uploaded from here, for .stats

    # ---- lifecycle --------------------------------------------------------
    async def open(self) -> None:
        """Find the blocks an earlier daemon staged here and not uploaded."""
        found, others = await trio.to_thread.run_sync(self._scan)
        for key, size in found:
            self.pending[key] = size
        if found:
            self._drained = trio.Event()
            log.warning("%d staged blocks (%d MiB) from an earlier run wait in %s; uploading them",
                        len(found), sum(s for _, s in found) >> 20, self.root)
        for vol, n in sorted(others.items()):
            log.warning("%d staged blocks of volume %s wait in %s: mount that volume with this "
                        "cache dir to upload them", n, vol, self.root)

    def _scan(self) -> tuple[list[tuple[str, int]], dict[str, int]]:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        found, others = [], {}
        for name in os.listdir(self.root):
            if name.endswith(".corrupt"):
                continue
            path = os.path.join(self.root, name)
            key = name.replace(",", "/")
            size = key.rsplit("_", 1)[-1]
            if not size.isdigit():
                continue  # not a block: nothing of ours
            st = os.stat(path)
            if st.st_size != int(size) + _SUM.size:
                # Cut short by a crash before its fsync returned: that write
                # was never acknowledged, and its slice never committed.
                log.info("removing %s, a staged write a crash interrupted", path)
                os.unlink(path)
                continue
            vol = key.split("/", 1)[0]
            if vol != self.volume:
                others[vol] = others.get(vol, 0) + 1
                continue
            found.append((st.st_mtime, key, st.st_size - _SUM.size))
        return [(k, s) for _, k, s in sorted(found)], others

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._uploader)

    async def drain(self, stall: float) -> None:
        """Wait (at unmount) until every staged block is uploaded, as long as
        uploads make progress: give up after `stall` seconds without one."""
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

    @property
    def bytes(self) -> int:
        return sum(self.pending.values())

    def _path(self, key: str) -> str:
        # One flat directory (',' never occurs in keys): a new block costs
        # one file fsync and one directory fsync, and no directory creation
        # (or rename) whose durability would need more fsyncs (measured on
        # ext4 here: 1.3-2.4 ms per 64 KiB block this way, ~15 ms with a
        # temporary file renamed into place).
        return os.path.join(self.root, key.replace("/", ","))

    # ---- staging and reading ----------------------------------------------
    async def stage(self, key: str, data) -> bool:
        """Keep the block durably until it is uploaded; False if there is no
        room (the caller then uploads synchronously or fails)."""
        try:
            await trio.to_thread.run_sync(self._write, key, data)
        except OSError as e:
            if not self._full_warned or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cannot stage block %s in %s: %s", key, self.root, e)
            self._full_warned = e.errno in (errno.ENOSPC, errno.EDQUOT)
            return False
        self._full_warned = False
        self.pending[key] = len(data)
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wakeup.set()
        return True

    def _write(self, key: str, data) -> None:
        st = os.statvfs(self.root)
        if (st.f_bavail * st.f_frsize - len(data)) < self.free_ratio * st.f_blocks * st.f_frsize:
            raise OSError(errno.ENOSPC, f"less than {self.free_ratio:.0%} of the disk would stay free")
        fd = os.open(self._path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for part in (data, _SUM.pack(xxhash.xxh64_intdigest(data))):
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)  # and its directory entry
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes | None:
        """A staged block's bytes (verified), or None if it is not staged."""
        if key not in self.pending:
            return None
        try:
            return await trio.to_thread.run_sync(self._read, key)
        except FileNotFoundError:
            return None  # uploaded (and removed) meanwhile: the store has it

    def _read(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            raw = f.read()
        data, tail = raw[:-_SUM.size], raw[-_SUM.size:]
        if len(raw) < _SUM.size or _SUM.unpack(tail)[0] != xxhash.xxh64_intdigest(data):
            raise OSError(errno.EIO, f"staged block {self._path(key)} is damaged")
        return data

    # ---- uploading --------------------------------------------------------
    async def _uploader(self) -> None:
        async with trio.open_nursery() as n:
            while True:
                waiting = [k for k in self.pending if k not in self._uploading]
                if not waiting:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                delay = self._retry_at - time.monotonic()
                if delay > 0:
                    with trio.move_on_after(delay):
                        await self._wakeup.wait()  # woken early only to see new keys
                    self._wakeup = trio.Event()
                    continue
                for key in waiting:
                    await self._limit.acquire()  # at most `uploads` at once
                    if self._retry_at > time.monotonic():
                        self._limit.release()
                        break  # an upload just failed: back off before the rest
                    self._uploading.add(key)
                    n.start_soon(self._upload, key)

    async def _upload(self, key: str) -> None:
        try:
            try:
                data = await trio.to_thread.run_sync(self._read, key)
            except OSError as e:
                log.error("staged block %s cannot be uploaded: %s; kept as %s.corrupt", key, e, key)
                await trio.to_thread.run_sync(_rename_quietly, self._path(key), self._path(key) + ".corrupt")
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
            await trio.to_thread.run_sync(_unlink_quietly, self._path(key))
            self.uploaded += 1
            self._forget(key)
            if self.on_uploaded is not None:
                self.on_uploaded(key, data)
        finally:
            self._uploading.discard(key)
            self._limit.release()
            self._wakeup.set()

    def _forget(self, key: str) -> None:
        self.pending.pop(key, None)
        if not self.pending:
            self._drained.set()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rename_quietly(src: str, dst: str) -> None:
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        pass
