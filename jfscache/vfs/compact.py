"""Compaction: a chunk fragmented by many small writes is rewritten as a few
slices holding exactly what it shows.

Every overwrite appends a slice, and a read resolves all of a chunk's slices
(newest wins): after 20,000 random writes a chunk holds thousands of slices
and every read spends its time resolving them. A chunk that passes
COMPACT_AT slices is compacted in the background; a writer that pushes one
past SLOW_AT waits for that compaction, so lists stay bounded.

The compactor reads the visible bytes through the cache, stores them as new
slices (one per run of data; gaps stay gaps), and commits with a script that
replaces exactly the slices it read, keeping any appended since. If the
chunk changed in between (a truncate, another compactor), nothing changes
and the new objects are deleted. Replaced slices are deleted only after a
grace period (meta: `compacted`), so a reader that resolved the old list
still finds their blocks; one that comes later re-resolves (vfs.read).
"""
from __future__ import annotations

import logging

import trio

from ..layout import Segment, block_key, resolve, slice_block_keys
from ..meta.engine import Slice
from ..cache.blocks import MissingBlock
from .reader import read_segments

log = logging.getLogger(__name__)

COMPACT_AT = 100  # slices in a chunk before it is compacted in the background
SLOW_AT = 400  # ... before a writer waits for that compaction
GAP = 64 << 10  # gaps up to this size are filled with zeros rather than splitting a run


def _runs(segs: list[Segment]) -> list[tuple[int, int]]:
    """[start, end) runs of data to store, in chunk offsets. Zero segments
    (truncated parts) count as data: they hide older slices below them."""
    runs: list[list[int]] = []
    for g in segs:
        if runs and g.start - runs[-1][1] <= GAP:
            runs[-1][1] = g.end
        else:
            runs.append([g.start, g.end])
    return [(a, b) for a, b in runs]


async def compact_chunk(meta, cache, volume: str, bs: int, ino: int, indx: int, max_uploads: int = 4) -> bool:
    """Compact one chunk; True if it was rewritten."""
    raw = await meta.read_chunk_raw(ino, indx)
    if len(raw) < 2:
        return False
    segs = resolve([Slice.unpack(b) for b in raw])
    new: list[Slice] = []
    limiter = trio.CapacityLimiter(max_uploads)

    async def put(key: str, data) -> None:
        async with limiter:
            await cache.put(key, data)

    try:
        for start, end in _runs(segs):
            try:
                data = b"".join(await read_segments(cache, volume, bs, segs, start, end - start))
            except MissingBlock:
                # The list read above is out of date (a truncate, an unlink or
                # another compaction removed those objects since), or a block
                # is lost, which fsck reports: either way, not this chunk now.
                log.debug("chunk %d of inode %d changed while being compacted; skipped", indx, ino)
                break
            sid = await meta.new_slice_id()
            async with trio.open_nursery() as n:
                for i in range(0, len(data), bs):
                    piece = memoryview(data)[i:i + bs]
                    n.start_soon(put, block_key(volume, sid, i // bs, len(piece)), piece)
            new.append(Slice(start, sid, len(data), 0, len(data)))
        else:  # every run was read
            if await meta.compact_commit(ino, indx, raw, new):
                log.debug("compacted chunk %d of inode %d: %d slices -> %d", indx, ino, len(raw), len(new))
                return True
    except BaseException:
        await _discard(cache, volume, bs, new)
        raise
    await _discard(cache, volume, bs, new)  # the chunk changed meanwhile
    return False


async def _discard(cache, volume: str, bs: int, slices: list[Slice]) -> None:
    with trio.CancelScope(shield=True):
        try:
            await cache.remove([key for s in slices for key in slice_block_keys(volume, s.id, s.size, bs)])
        except Exception as e:  # orphans at worst: gc finds them
            log.debug("removing unused compaction blocks failed: %s", e)
