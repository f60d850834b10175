"""Reading a chunk: its visible segments mapped onto blocks in the cache.

Shared by reads through the mount and by the compactor, which reads a
chunk's visible bytes to rewrite them as one slice.
"""
from __future__ import annotations

from ..layout import Segment, block_key


async def read_segments(cache, volume: str, bs: int, segs: list[Segment], coff: int, n: int) -> list:
    """The bytes [coff, coff+n) of a chunk resolved into `segs`, as a list of
    buffers (views into cached blocks where possible; gaps read as zeros)."""
    out = []
    pos, end = coff, coff + n
    for g in segs:
        if g.end <= pos:
            continue
        if g.start >= end:
            break
        if g.start > pos:
            out.append(bytes(g.start - pos))
            pos = g.start
        stop = min(end, g.end)
        if g.sid == 0:
            out.append(bytes(stop - pos))
        else:
            so = g.soff + (pos - g.start)
            while pos < stop:
                bi, bo = divmod(so, bs)
                take = min(stop - pos, bs - bo)
                size = min(bs, g.ssize - bi * bs)
                out.append(await cache.read(block_key(volume, g.sid, bi, size), bo, take, size))
                pos += take
                so += take
        pos = stop
    if pos < end:
        out.append(bytes(end - pos))
    return out
