"""The data layout (DESIGN.md, "Data layout"): decided once, it is forever.

A file is cut into 64 MiB chunks at fixed offsets; each write to a chunk makes
a slice with a fresh id; a slice's bytes are stored as immutable blocks of at
most `block_size` bytes under keys that name the slice, block and size.
"""
from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZE = 64 << 20
DEFAULT_BLOCK_SIZE = 4 << 20
# The largest file: 1 PiB. Lengths and offsets stay exact in the Lua scripts
# (doubles are exact below 2^53) with room for sums, and chunk indexes fit 2^24.
# Writes and truncates past it fail with EFBIG.
MAX_FILE_SIZE = 1 << 50


def block_key(volume: str, slice_id: int, index: int, size: int) -> str:
    return f"{volume}/chunks/{slice_id // 1_000_000}/{slice_id // 1000}/{slice_id}_{index}_{size}"


def slice_block_keys(volume: str, slice_id: int, slice_size: int, block_size: int) -> list[str]:
    """Every block key of a slice of that size."""
    n = (slice_size + block_size - 1) // block_size
    return [block_key(volume, slice_id, i, min(block_size, slice_size - i * block_size)) for i in range(n)]


@dataclass(slots=True)
class Segment:
    """A visible piece of a chunk: [start, end) in chunk offsets, backed by
    bytes at `soff` of slice `sid` (of total size `ssize`), or zeros if sid == 0."""
    start: int
    end: int
    sid: int
    ssize: int
    soff: int


def resolve(slices) -> list[Segment]:
    """Overlay a chunk's slices, oldest first, newest wins; sorted, non-overlapping.
    Gaps (never written) are simply absent and read as zeros."""
    segs: list[Segment] = []
    for s in slices:
        start, end = s.pos, s.pos + s.len
        if end <= start:
            continue
        kept = []
        for g in segs:
            if g.end <= start or g.start >= end:
                kept.append(g)
                continue
            if g.start < start:
                kept.append(Segment(g.start, start, g.sid, g.ssize, g.soff))
            if g.end > end:
                kept.append(Segment(end, g.end, g.sid, g.ssize, g.soff + (end - g.start)))
        kept.append(Segment(start, end, s.id, s.size, s.off))
        kept.sort(key=lambda g: g.start)
        segs = kept
    return segs
