"""Warmup: expand paths into the blocks that back them, and warm, check or
evict those blocks through a Warmer (the cache group, or the local cache).

The expansion reads only metadata: directories recursively, each file's
existing chunks (k<ino>), and the blocks behind their visible segments, so a
sparse or overwritten file warms what a reader would fetch, nothing more.
Progress is a small dict the control file streams back to `jfscache warmup`.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..layout import CHUNK_SIZE, block_key, resolve

log = logging.getLogger(__name__)

MODES = ("warm", "check", "evict")


class Warmer(Protocol):
    """Where blocks are warmed: implemented by the cache group (each block
    at its owner) and by the block cache alone (this node)."""

    async def warm(self, key: str) -> bool: ...  # True if it was cached already
    async def check(self, keys: list[str]) -> list[tuple[str, bool | None]]: ...  # (member, cached or unknown)
    async def evict(self, keys: list[str]) -> int: ...


@dataclass
class Progress:
    mode: str
    files: int = 0
    blocks: int = 0
    bytes: int = 0
    done_blocks: int = 0
    done_bytes: int = 0
    cached_blocks: int = 0  # already cached (warm, check) or evicted (evict)
    cached_bytes: int = 0
    unknown_blocks: int = 0  # check: blocks whose owner could not be asked
    errors: int = 0
    expanded: bool = False
    finished: bool = False
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    per_path: dict = field(default_factory=dict)  # path -> [blocks, cached blocks]
    per_member: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def report(self) -> dict:
        self.seconds = round(time.monotonic() - self.started, 3)
        d = {k: getattr(self, k) for k in ("mode", "files", "blocks", "bytes", "done_blocks", "done_bytes",
                                           "cached_blocks", "cached_bytes", "unknown_blocks", "errors", "expanded", "finished",
                                           "error", "seconds")}
        d["mb_per_s"] = round(self.done_bytes / 1e6 / self.seconds, 1) if self.seconds else 0.0
        if self.mode == "check":
            d["cached_ratio"] = round(self.cached_blocks / self.blocks, 4) if self.blocks else 1.0
            d["per_path"] = {p: {"blocks": b, "cached": c, "cached_ratio": round(c / b, 4) if b else 1.0}
                             for p, (b, c) in self.per_path.items()}
            d["per_member"] = {m: {"blocks": b, "cached": c} for m, (b, c) in self.per_member.items()}
        return d


def _chunk_blocks(segs, bs: int, volume: str, out: dict) -> None:
    """Block keys (-> size) behind a chunk's visible segments."""
    for g in segs:
        if g.sid == 0:
            continue
        first = g.soff // bs
        last = (g.soff + g.end - g.start - 1) // bs
        for bi in range(first, last + 1):
            size = min(bs, g.ssize - bi * bs)
            out[block_key(volume, g.sid, bi, size)] = size


async def expand(meta, volume: str, bs: int, targets: list[tuple[str, int]], progress: Progress,
                 ) -> list[tuple[str, dict]]:
    """For each (path, inode): the blocks (key -> size) of every file under it."""
    out = []
    seen: set[int] = set()
    for path, ino in targets:
        blocks: dict[str, int] = {}
        stack = [ino]
        while stack:
            i = stack.pop()
            if i in seen:  # hard links, or a path given twice
                continue
            seen.add(i)
            a = await meta.getattr(i)
            if a.type == "d":
                _, entries = await meta.readdir(i)
                stack.extend(e for _, e, t in entries if t in "fd")
            elif a.type == "f":
                progress.files += 1
                for indx in await meta.chunk_indexes(i):
                    if indx * CHUNK_SIZE < a.length:
                        _chunk_blocks(resolve(await meta.read_chunk(i, indx)), bs, volume, blocks)
        progress.blocks += len(blocks)
        progress.bytes += sum(blocks.values())
        progress.per_path[path] = [len(blocks), 0]
        out.append((path, blocks))
    progress.expanded = True
    return out


async def run(meta, warmer: Warmer, volume: str, bs: int, targets: list[tuple[str, int]], mode: str,
              threads: int, progress: Progress) -> None:
    """Warm, check or evict everything under `targets`, `threads` blocks at a time."""
    try:
        per_path = await expand(meta, volume, bs, targets, progress)
        if mode == "warm":
            await _warm(warmer, per_path, threads, progress)
        else:
            batch = 256  # keys per check/evict request
            for path, blocks in per_path:
                keys = list(blocks)
                for i in range(0, len(keys), batch):
                    part = keys[i:i + batch]
                    if mode == "check":
                        for key, (member, cached) in zip(part, await warmer.check(part)):
                            _count(progress, path, member, key, blocks[key], cached)
                    else:
                        progress.cached_blocks += await warmer.evict(part)
                        progress.done_blocks += len(part)
                        progress.done_bytes += sum(blocks[k] for k in part)
    except Exception as e:
        log.warning("warmup (%s) failed: %s", mode, e)
        progress.error = str(e) or type(e).__name__
    finally:
        progress.finished = True
        r = progress.report()
        log.info("warmup %s: %d files, %d blocks, %.1f MiB in %.1f s (%.1f MB/s), %d cached, %d errors",
                 mode, r["files"], r["blocks"], r["bytes"] / 2**20, r["seconds"], r["mb_per_s"],
                 r["cached_blocks"], r["errors"])


def _count(progress: Progress, path: str, member: str, key: str, size: int, cached: bool | None) -> None:
    progress.done_blocks += 1
    progress.done_bytes += size
    progress.per_member[member][0] += 1
    if cached is None:  # the owner could not be asked: unknown, reported apart
        progress.unknown_blocks += 1
        return
    if cached:
        progress.cached_blocks += 1
        progress.cached_bytes += size
        progress.per_path[path][1] += 1
        progress.per_member[member][1] += 1


async def _warm(warmer: Warmer, per_path: list[tuple[str, dict]], threads: int, progress: Progress) -> None:
    send, receive = trio.open_memory_channel(threads)

    async def worker():
        async for path, key, size in receive:
            try:
                cached = await warmer.warm(key)
            except Exception as e:  # counted and reported; the rest goes on
                progress.errors += 1
                log.debug("warming %s failed: %s", key, e)
                continue
            progress.done_blocks += 1
            progress.done_bytes += size
            if cached:
                progress.cached_blocks += 1
                progress.cached_bytes += size
                progress.per_path[path][1] += 1

    async with trio.open_nursery() as n:
        for _ in range(max(1, threads)):
            n.start_soon(worker)
        async with send:
            for path, blocks in per_path:
                for key, size in blocks.items():
                    await send.send((path, key, size))
