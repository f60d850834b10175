"""fsck and gc: checks and cleanups of a volume that run without a mount.

Both walk the metadata once (one SCAN of the volume's Redis database) and the
object store once (a listing of the volume's blocks). fsck reports (and with
--repair fixes what metadata alone can fix); gc deletes what nothing
references, and with --compact rewrites fragmented chunks.

Objects a writer uploaded but has not committed yet look unreferenced too, so
gc deletes an unreferenced object only if its slice id was allocated before
the previous gc run (`gcMark`, the slice counter then): a slice still open
across two gc runs is the one thing this would hit, so gc runs should be
further apart than the longest write of one file (hours, not minutes).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from .layout import CHUNK_SIZE, slice_block_keys
from .meta import lua
from .meta.engine import SESSION_TIMEOUT, Meta, Slice

log = logging.getLogger(__name__)

_CHUNK_KEY = re.compile(rb"^c(\d+)_(\d+)$")
_BLOCK = re.compile(r"/chunks/\d+/\d+/(\d+)_(\d+)_(\d+)$")


def _align4k(n: int) -> int:
    return (n + 4095) // 4096 * 4096


@dataclass
class Scan:
    """What the metadata holds, from one pass over the keys."""
    files: dict[int, int] = field(default_factory=dict)  # file inode -> length
    inodes: set[int] = field(default_factory=set)
    dirs: list[int] = field(default_factory=list)
    chunks: dict[tuple[int, int], list[Slice]] = field(default_factory=dict)
    cut: list[bytes] = field(default_factory=list)  # g-keys (cut chunk lists)
    slices: dict[int, int] = field(default_factory=dict)  # every referenced slice id -> size


async def scan(meta: Meta) -> Scan:
    r = meta.r
    out = Scan()
    cursor = b"0"
    while True:
        cursor, keys = await r.execute("SCAN", cursor, "COUNT", 1000)
        inode_keys = [k for k in keys if k[:1] == b"i" and k[1:].isdigit()]
        chunk_keys = [k for k in keys if _CHUNK_KEY.match(k)]
        cut_keys = [k for k in keys if k[:1] == b"g" and k[1:].isdigit()]
        attrs = await r.pipeline([("HMGET", k, "type", "length") for k in inode_keys])
        for k, (typ, length) in zip(inode_keys, attrs):
            ino = int(k[1:])
            out.inodes.add(ino)
            if typ == b"f":
                out.files[ino] = int(length or 0)
            elif typ == b"d":
                out.dirs.append(ino)
        for k, raw in zip(chunk_keys, await r.pipeline([("LRANGE", k, 0, -1) for k in chunk_keys])):
            ino, indx = (int(x) for x in _CHUNK_KEY.match(k).groups())
            out.chunks[(ino, indx)] = [Slice.unpack(b) for b in raw]
        for k, raw in zip(cut_keys, await r.pipeline([("LRANGE", k, 0, -1) for k in cut_keys])):
            out.cut.append(k)
            _refer(out, [Slice.unpack(b) for b in raw])
        if cursor == b"0":
            break
    for sl in out.chunks.values():
        _refer(out, sl)
    replaced = await r.execute("ZRANGE", "compacted", 0, -1)
    queued = await r.execute("LRANGE", "delslices", 0, -1)
    _refer(out, [Slice.unpack(b) for b in replaced + queued])
    return out


def _refer(out: Scan, slices: list[Slice]) -> None:
    for s in slices:
        if s.id:
            out.slices[s.id] = s.size


async def list_blocks(storage, volume: str) -> dict[int, dict[str, int]]:
    """The volume's stored blocks: slice id -> {key: size}."""
    out: dict[int, dict[str, int]] = {}
    async for key, size in storage.list(f"{volume}/chunks/"):
        m = _BLOCK.search(key)
        if m:
            out.setdefault(int(m.group(1)), {})[key] = size
    return out


# ---- fsck -------------------------------------------------------------------
async def fsck(meta: Meta, storage, repair: bool = False) -> dict:
    """Check the volume; returns a report (lists are capped in length)."""
    settings = meta.settings
    volume, bs = settings["name"], int(settings.get("block_size", 4 << 20))
    s = await scan(meta)
    r = meta.r
    report: dict = {"files": len(s.files), "inodes": len(s.inodes), "chunks": len(s.chunks),
                    "slices": len(s.slices)}

    # Blocks that live files need but the store lacks.
    stored = await list_blocks(storage, volume)
    missing = []
    for (ino, indx), slices in s.chunks.items():
        if ino not in s.files:
            continue
        for sl in slices:
            if sl.id and sl.id not in stored:
                missing.append({"inode": ino, "chunk": indx, "slice": sl.id})
            elif sl.id:
                have = stored[sl.id]
                missing += [{"inode": ino, "chunk": indx, "slice": sl.id, "block": k}
                            for k in slice_block_keys(volume, sl.id, sl.size, bs) if k not in have]
    report["missing_blocks"] = missing[:100]
    report["missing_blocks_count"] = len(missing)
    # Blocks staged on a node and not uploaded yet are missing from the
    # store for now, not lost: say where they wait.
    report["pending_uploads"] = await meta.pending_uploads()

    # Chunk lists of inodes that are gone (and not waiting for the deleter).
    pending = {int(m.split(b":")[0]) for m in await r.execute("ZRANGE", "delfiles", 0, -1)}
    leaked = sorted(k for k in s.chunks if k[0] not in s.files and k[0] not in pending)
    queued_cut = set(await r.execute("LRANGE", "delchunks", 0, -1))
    leaked_cut = [k for k in s.cut if k not in queued_cut]
    report["leaked_chunk_lists"] = [f"c{i}_{j}" for i, j in leaked][:100] + [k.decode() for k in leaked_cut][:100]
    report["leaked_chunk_lists_count"] = len(leaked) + len(leaked_cut)

    # Counters.
    used = sum(_align4k(n) for n in s.files.values())
    counters = await r.pipeline([("GET", "usedSpace"), ("GET", "totalInodes")])
    have_used, have_inodes = (int(c or 0) for c in counters)
    report["used_space"] = {"counter": have_used, "actual": used}
    report["total_inodes"] = {"counter": have_inodes, "actual": len(s.inodes)}

    # Directory entries whose inode is gone.
    dangling = []
    for d in s.dirs:
        flat = await r.execute("HGETALL", f"d{d}")
        for name, entry in zip(flat[0::2], flat[1::2]):
            if int(entry[1:]) not in s.inodes:
                dangling.append((d, name))
    report["dangling_entries"] = [{"dir": d, "name": n.decode(errors="replace")} for d, n in dangling][:100]
    report["dangling_entries_count"] = len(dangling)

    # Sessions that stopped heartbeating (their owners died).
    dead = await r.execute("ZRANGEBYSCORE", "sessions", "-inf", int(time.time()) - SESSION_TIMEOUT)
    report["dead_sessions"] = [int(x) for x in dead]

    problems = (len(missing) + report["leaked_chunk_lists_count"] + len(dangling) + len(dead)
                + (have_used != used) + (have_inodes != len(s.inodes)))
    report["problems"] = problems
    if repair and problems:
        report["repaired"] = await _repair(meta, s, leaked, leaked_cut, used, dangling, dead)
    return report


async def _repair(meta: Meta, s: Scan, leaked, leaked_cut, used: int, dangling, dead) -> list[str]:
    """Fix what metadata alone can fix. Missing blocks cannot be fixed: the
    report names the files that lost data."""
    r, done = meta.r, []
    await r.pipeline([("SET", "usedSpace", used), ("SET", "totalInodes", len(s.inodes))])
    done.append("counters recomputed")
    for d, name in dangling:
        await r.execute("HDEL", f"d{d}", name)
    if dangling:
        done.append(f"{len(dangling)} dangling entries removed")
    for sid in dead:
        await r.eval(lua.CLOSE_SESSION, [], [sid, int(time.time())])
    if dead:
        done.append(f"{len(dead)} dead sessions closed (their open-unlinked files deleted)")
    # Leaked chunk lists go to the deleter's queue, which deletes their objects.
    for ino, indx in leaked:
        g = f"g{await r.execute('INCR', 'nextdelchunk')}"
        await r.pipeline([("RENAME", f"c{ino}_{indx}", g), ("RPUSH", "delchunks", g)])
    for k in leaked_cut:
        await r.execute("RPUSH", "delchunks", k)
    if leaked or leaked_cut:
        done.append(f"{len(leaked) + len(leaked_cut)} leaked chunk lists queued for deletion")
    return done


# ---- gc ---------------------------------------------------------------------
async def gc(meta: Meta, storage, cache=None, dry_run: bool = False, compact: bool = False) -> dict:
    """Delete objects nothing references (of slices allocated before the
    previous run), and with `compact` rewrite chunks of more than one slice."""
    from .vfs.compact import compact_chunk
    settings = meta.settings
    volume, bs = settings["name"], int(settings.get("block_size", 4 << 20))
    r = meta.r
    report: dict = {}
    if compact and cache is not None and not dry_run:
        s = await scan(meta)
        done = 0
        for (ino, indx), slices in s.chunks.items():
            if len(slices) > 1 and ino in s.files and indx * CHUNK_SIZE < s.files[ino]:
                done += await compact_chunk(meta, cache, volume, bs, ino, indx)
        report["compacted_chunks"] = done
    mark = int(await r.execute("GET", "gcMark") or 0)
    now_mark = int(await r.execute("GET", "nextslice") or 0)
    s = await scan(meta)  # after compaction: its new slices are referenced
    stored = await list_blocks(storage, volume)
    orphans = {sid: keys for sid, keys in stored.items() if sid not in s.slices}
    old = {sid: keys for sid, keys in orphans.items() if sid < mark}
    report.update(objects=sum(len(k) for k in stored.values()), orphan_slices=len(orphans),
                  deletable_slices=len(old), deletable_bytes=sum(sum(k.values()) for k in old.values()),
                  kept_recent_slices=len(orphans) - len(old))
    if not dry_run:
        doomed = [key for keys in old.values() for key in keys]
        await storage.delete_many(doomed)
        await r.execute("SET", "gcMark", now_mark)
        report["deleted_objects"] = sum(len(k) for k in old.values())
    return report
