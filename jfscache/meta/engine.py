"""The metadata engine: a POSIX tree, chunk slice lists and sessions in Redis.

Failures are raised as OSError(errno) so that callers above (vfs, fuse) can
pass them through without knowing Redis. Every multi-key mutation is one Lua
script (see lua.py), so it is atomic across all nodes mounting the volume.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import struct
import time
import uuid
from dataclasses import dataclass

from ..layout import CHUNK_SIZE, MAX_FILE_SIZE
from . import lua
from .redisio import KeyedCommand, Redis, RedisError, RedisUnavailable

ROOT_INODE = 1
NAME_MAX = 255
# 2: chunk index sets (k<ino>) and the xattr flag; version 1 volumes are upgraded on load.
FORMAT_VERSION = 2
SESSION_TIMEOUT = 300  # seconds without heartbeat before a session is reaped
HEARTBEAT = 12

TYPES = {"f": 0o100000, "d": 0o040000, "l": 0o120000, "p": 0o010000, "c": 0o020000, "b": 0o060000, "s": 0o140000}
_HMGET_ATTRS = KeyedCommand("HMGET", *lua.ATTR_FIELDS)  # Meta.getattrs

_SLICE = struct.Struct(">IQIII")  # pos in chunk, slice id, slice size, offset in slice, length


class NotFormatted(Exception):
    pass


def volume_settings(name: str, storage: str, bucket: str, block_size: int = 4 << 20,
                    capacity: int = 0, inodes: int = 0) -> dict:
    """The settings record of a new volume."""
    return {
        "name": name, "uuid": str(uuid.uuid4()), "storage": storage, "bucket": bucket,
        "block_size": block_size, "capacity": capacity, "inodes": inodes, "format_version": FORMAT_VERSION,
        # Peers of a cache group prove they can read this record with it.
        "group_secret": secrets.token_hex(16), "created": int(time.time()),
    }


@dataclass(slots=True)
class Slice:
    pos: int  # where it starts within the chunk
    id: int  # 0 means zeros (a truncated hole)
    size: int  # total size of the slice object (its blocks)
    off: int  # offset inside the slice where the visible part starts
    len: int

    def pack(self) -> bytes:
        return _SLICE.pack(self.pos, self.id, self.size, self.off, self.len)

    @classmethod
    def unpack(cls, b: bytes) -> "Slice":
        return cls(*_SLICE.unpack(b))


@dataclass(slots=True)
class Attr:
    ino: int
    type: str
    mode: int  # permission bits including suid/sgid/sticky
    uid: int
    gid: int
    rdev: int
    nlink: int
    length: int
    atime: int  # ns
    mtime: int
    ctime: int
    parent: int
    xattr: bool = True  # may have extended attributes (False: known to have none)

    @property
    def st_mode(self) -> int:
        return TYPES[self.type] | self.mode

    @classmethod
    def from_fields(cls, ino: int, v: list) -> "Attr":
        """From an HMGET of lua.ATTR_FIELDS."""
        return cls(ino, v[0].decode(), int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), int(v[6]),
                   int(v[7]), int(v[8]), int(v[9]), int(v[10] or 0), v[11] != b"0")


def _oserror(e: RedisError) -> OSError:
    # Scripts fail with an errno name; Redis may prefix it ("ERR ENOTEMPTY").
    for word in str(e).split()[:2]:
        code = getattr(errno, word, None) if word.startswith("E") else None
        if isinstance(code, int):
            return OSError(code, os.strerror(code))
    return OSError(errno.EIO, f"metadata error: {e}")


def _check_name(name: bytes):
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def _check_size(n: int) -> None:
    if n > MAX_FILE_SIZE:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


def _now() -> str:
    return str(time.time_ns())


class Meta:
    """One volume's metadata. All methods are trio-async."""

    def __init__(self, url: str):
        self.url = url
        self.r = Redis(url)
        self.settings: dict = {}
        self.sid = 0
        self._ids: dict[str, tuple[int, int]] = {}  # counter -> (next id, end of reserved range)

    # ---- volume -----------------------------------------------------------
    async def load(self) -> dict:
        raw = await self.r.execute("GET", "setting")
        if raw is None:
            raise NotFormatted(f"no jfscache volume is formatted in Redis at {self.r.where} (run 'jfscache format' first)")
        settings = json.loads(raw)
        version = int(settings.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise NotFormatted(f"the volume in Redis at {self.r.where} was formatted by a newer jfscache "
                               f"(format version {version}; this one reads {FORMAT_VERSION})")
        if version < 2:
            await self._index_chunks()
            settings["format_version"] = FORMAT_VERSION
            await self.r.execute("SET", "setting", json.dumps(settings))
        self.settings = settings
        return self.settings

    async def _index_chunks(self) -> None:
        """Upgrade from format 1: build each file's chunk index set (k<ino>)
        from its chunk keys. Idempotent, so concurrent mounts may both run it."""
        cursor = b"0"
        while True:
            cursor, keys = await self.r.execute("SCAN", cursor, "MATCH", "c*_*", "COUNT", 1000)
            cmds = []
            for k in keys:
                ino, _, indx = k[1:].partition(b"_")
                if ino.isdigit() and indx.isdigit():
                    cmds.append(("ZADD", b"k" + ino, indx, indx))
            await self.r.pipeline(cmds)
            if cursor == b"0":
                return

    async def check_formattable(self, force: bool = False) -> bytes | None:
        """The current settings record (None if there is none); refuses an
        existing volume unless forced."""
        old = await self.r.execute("GET", "setting")
        if old is not None and not force:
            name = json.loads(old).get("name")
            raise FileExistsError(f"Redis at {self.r.where} already holds volume '{name}' (use --force to overwrite its settings)")
        return old

    async def format(self, settings: dict, force: bool = False) -> None:
        old = await self.check_formattable(force)
        now = _now()
        cmds = [("SET", "setting", json.dumps(settings))]
        if old is None:
            cmds += [
                ("HSET", f"i{ROOT_INODE}", "type", "d", "mode", 0o777, "uid", 0, "gid", 0, "rdev", 0, "nlink", 2,
                 "length", 0, "atime", now, "mtime", now, "ctime", now, "parent", ROOT_INODE),
                ("SET", "nextinode", ROOT_INODE), ("SET", "nextslice", 0), ("SET", "usedSpace", 0),
                ("SET", "totalInodes", 1),
            ]
        await self.r.pipeline(cmds)
        self.settings = settings

    @property
    def capacity(self) -> int:
        return int(self.settings.get("capacity", 0))

    # ---- sessions ---------------------------------------------------------
    async def new_session(self, mountpoint: str) -> int:
        self.sid = await self.r.execute("INCR", "nextsession")
        info = {"host": socket.gethostname(), "mountpoint": mountpoint, "pid": os.getpid(),
                "started": int(time.time()), "version": 1}
        await self.r.pipeline([("ZADD", "sessions", int(time.time()), self.sid),
                               ("HSET", "sessionInfos", self.sid, json.dumps(info))])
        return self.sid

    async def set_pending_uploads(self, where: str, blocks: int, nbytes: int) -> None:
        """Publish the blocks staged at `where` (host:cache dir) and not yet
        uploaded. Kept per place, not per session: a node that crashed with
        uploads pending still has them, and its next mount takes them over."""
        if blocks:
            info = {"blocks": blocks, "bytes": nbytes, "session": self.sid, "updated": int(time.time())}
            await self.r.execute("HSET", "pendingUploads", where, json.dumps(info))
        else:
            await self.r.execute("HDEL", "pendingUploads", where)

    async def pending_uploads(self) -> dict[str, dict]:
        flat = await self.r.execute("HGETALL", "pendingUploads")
        return {flat[i].decode(): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def heartbeat(self) -> None:
        """Refresh this session and reap sessions that stopped heartbeating."""
        now = int(time.time())
        await self.r.execute("ZADD", "sessions", now, self.sid)
        stale = await self.r.execute("ZRANGEBYSCORE", "sessions", "-inf", now - SESSION_TIMEOUT)
        for sid in stale:
            await self.r.eval(lua.CLOSE_SESSION, [], [sid, now])

    async def close_session(self) -> None:
        if self.sid:
            await self.r.eval(lua.CLOSE_SESSION, [], [self.sid, int(time.time())])
            self.sid = 0

    async def sessions(self) -> list[dict]:
        flat = await self.r.execute("ZRANGE", "sessions", 0, -1, "WITHSCORES")
        infos = await self.r.execute("HGETALL", "sessionInfos")
        info = {infos[i]: infos[i + 1] for i in range(0, len(infos), 2)}
        out = []
        for i in range(0, len(flat), 2):
            sid = flat[i]
            d = json.loads(info.get(sid, b"{}"))
            d.update(sid=int(sid), heartbeat=int(float(flat[i + 1])))
            out.append(d)
        return out

    # ---- counters ---------------------------------------------------------
    async def _next_id(self, counter: str) -> int:
        """A fresh id from a Redis counter, reserved 100 at a time per client
        (one round trip per hundred creates or slices)."""
        nxt, end = self._ids.get(counter, (0, 0))
        if nxt >= end:
            top = await self.r.execute("INCRBY", counter, 100)
            nxt, end = top - 99, top + 1
        self._ids[counter] = (nxt + 1, end)
        return nxt

    async def _next_inode(self) -> int:
        return await self._next_id("nextinode")

    async def new_slice_id(self) -> int:
        return await self._next_id("nextslice")

    async def _script(self, script, keys, args):
        try:
            return await self.r.eval(script, keys, args)
        except RedisError as e:
            raise _oserror(e) from None

    # ---- tree -------------------------------------------------------------
    async def resolve(self, path: str) -> int:
        """The inode of the directory at `path` from the volume's root (--subdir)."""
        ino = ROOT_INODE
        for part in filter(None, path.split("/")):
            if part in (".", ".."):
                raise ValueError(f"--subdir {path!r}: give a path without '.' or '..'")
            try:
                a, _ = await self.lookup(ino, part.encode())
            except OSError as e:
                raise ValueError(f"--subdir {path!r}: {part!r} {e.strerror.lower()} "
                                 f"in volume {self.settings['name']}") from None
            if a.type != "d":
                raise ValueError(f"--subdir {path!r}: {part!r} is not a directory in volume {self.settings['name']}")
            ino = a.ino
        return ino

    async def getattr(self, ino: int) -> Attr:
        v = await self.r.execute("HMGET", f"i{ino}", *lua.ATTR_FIELDS)
        if v[0] is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return Attr.from_fields(ino, v)

    async def getattr_and_chunk(self, ino: int, indx: int) -> tuple[Attr, list[Slice]]:
        v, raw = await self.r.pipeline([("HMGET", f"i{ino}", *lua.ATTR_FIELDS), ("LRANGE", f"c{ino}_{indx}", 0, -1)])
        if v[0] is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return Attr.from_fields(ino, v), [Slice.unpack(b) for b in raw]

    async def lookup(self, parent: int, name: bytes) -> tuple[Attr, list[Slice]]:
        """The entry's attributes, and chunk 0's slices if it is a file."""
        _check_name(name)
        res = await self.r.eval(lua.LOOKUP, [f"d{parent}"], [name])
        if res is None or res[1][0] is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return Attr.from_fields(int(res[0][1:]), res[1]), [Slice.unpack(b) for b in res[2]]

    async def lookup_many(self, parent: int, names: list[bytes]) -> list[Attr | None]:
        """Entries and attributes of many names of one directory, in two
        round trips (None where a name or its inode is gone)."""
        entries = await self.r.execute("HMGET", f"d{parent}", *names)
        inos = [int(e[1:]) for e in entries if e is not None]
        attrs = iter(await self.getattrs(inos))
        return [next(attrs) if e is not None else None for e in entries]

    async def mknod(self, parent: int, name: bytes, typ: str, mode: int, uid: int, gid: int,
                    rdev: int = 0, target: bytes = b"") -> tuple[Attr, Attr]:
        """Create an inode; returns its attributes and the parent's new ones."""
        _check_name(name)
        ino = await self._next_inode()
        now = _now()
        parent_field = parent if typ == "d" else 0
        res = await self._script(lua.CREATE, [f"i{parent}", f"d{parent}", f"i{ino}"],
                                 [name, ino, typ, mode & 0o7777, uid, gid, rdev, now, target,
                                  int(self.settings.get("inodes", 0)), parent_field])
        n = int(now)
        return (Attr(ino, typ, int(res[0]), uid, int(res[1]), rdev, 2 if typ == "d" else 1,
                     len(target) if typ == "l" else 0, n, n, n, parent_field, False),
                Attr.from_fields(parent, res[2]))

    async def readlink(self, ino: int) -> bytes:
        t = await self.r.execute("GET", f"s{ino}")
        if t is None:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return t

    async def unlink(self, parent: int, name: bytes) -> tuple[int, bool]:
        """Returns (inode, whether it reached nlink 0 and waits for drop())."""
        res = await self._script(lua.UNLINK, [f"i{parent}", f"d{parent}"],
                                 [name, _now(), self.sid, int(time.time())])
        return int(res[0]), bool(res[1])

    async def drop(self, ino: int) -> None:
        """Delete a file that has no links and no open handle left."""
        await self._script(lua.DROP, [], [ino, self.sid, int(time.time())])

    async def rmdir(self, parent: int, name: bytes) -> int:
        return int(await self._script(lua.RMDIR, [f"i{parent}", f"d{parent}"], [name, _now()]))

    async def rename(self, psrc: int, nsrc: bytes, pdst: int, ndst: bytes, flags: int) -> tuple[int, int, bool]:
        """Returns (moved inode, replaced inode or 0, whether the replaced file waits for drop())."""
        _check_name(ndst)
        res = await self._script(lua.RENAME, [f"i{psrc}", f"d{psrc}", f"i{pdst}", f"d{pdst}"],
                                 [nsrc, ndst, flags, _now(), self.sid, int(time.time())])
        return int(res[0]), int(res[1] or 0), bool(res[2])

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        _check_name(name)
        flat = await self._script(lua.LINK, [f"i{ino}", f"i{parent}", f"d{parent}"], [name, _now(), ino])
        return Attr.from_fields(ino, flat)

    async def setattr(self, ino: int, **fields) -> Attr:
        """Set mode/uid/gid/atime/mtime (ns); ctime becomes now."""
        args = [_now()]
        for k, v in fields.items():
            args += [k, v]
        flat = await self._script(lua.SETATTR, [f"i{ino}"], args)
        return Attr.from_fields(ino, flat)

    async def truncate(self, ino: int, length: int) -> Attr:
        _check_size(length)
        flat = await self._script(lua.TRUNCATE, [f"i{ino}", f"k{ino}"], [length, _now(), CHUNK_SIZE, self.capacity, ino])
        return Attr.from_fields(ino, flat)

    async def readdir(self, ino: int) -> tuple[int, list[tuple[bytes, int, str]]]:
        """The directory's parent and all entries as (name, inode, type char)."""
        parent, flat = await self.r.pipeline([("HGET", f"i{ino}", "parent"), ("HGETALL", f"d{ino}")])
        if parent is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return int(parent), [(flat[i], int(flat[i + 1][1:]), flat[i + 1][:1].decode())
                             for i in range(0, len(flat), 2)]

    async def getattrs(self, inos: list[int]) -> list[Attr | None]:
        """Attributes of many inodes in one round trip (None for vanished ones)."""
        replies = await self.r.read_many(_HMGET_ATTRS, [b"i%d" % i for i in inos])
        return [Attr.from_fields(i, v) if v[0] is not None else None for i, v in zip(inos, replies)]

    # ---- data -------------------------------------------------------------
    async def chunk_indexes(self, ino: int) -> list[int]:
        """The indexes of a file's chunks that have slices, ascending."""
        return [int(i) for i in await self.r.execute("ZRANGE", f"k{ino}", 0, -1)]

    async def read_chunk(self, ino: int, indx: int) -> list[Slice]:
        return [Slice.unpack(b) for b in await self.r.execute("LRANGE", f"c{ino}_{indx}", 0, -1)]

    async def write_slice(self, ino: int, indx: int, s: Slice) -> tuple[int, int]:
        """Append a slice whose blocks are stored; returns (the new file
        length, how many slices the chunk has now)."""
        end = indx * CHUNK_SIZE + s.pos + s.len
        _check_size(end)
        length, count = await self._script(lua.WRITE, [f"i{ino}", f"c{ino}_{indx}", f"k{ino}"],
                                           [s.pack(), end, _now(), self.capacity, indx])
        return int(length), int(count)

    async def append_slice(self, ino: int, sid: int, n: int) -> int:
        """Commit a stored slice of n bytes at the file's current end (atomic
        across nodes); returns the new length."""
        if n > CHUNK_SIZE:
            raise ValueError("an appended slice is at most one chunk")
        length, _ = await self._script(lua.APPEND, [f"i{ino}", f"k{ino}"],
                                       [sid, n, _now(), self.capacity, CHUNK_SIZE, MAX_FILE_SIZE, ino])
        return int(length)

    # ---- deletion queues (drained by the background deleter, in batches) ---
    async def deleted_files(self, limit: int = 100) -> list[bytes]:
        """Members ("<ino>:<length>") of files whose data waits to be deleted."""
        return await self.r.execute("ZRANGE", "delfiles", 0, limit - 1)

    async def files_chunks(self, inos: list[int], limit: int = 100) -> list[list[tuple[bytes, list[Slice]]]]:
        """For each deleted file, up to `limit` of its remaining chunks as
        (index, slices): two round trips for the whole batch."""
        idxs = await self.r.pipeline([("ZRANGE", f"k{ino}", 0, limit - 1) for ino in inos])
        lists = iter(await self.r.pipeline([("LRANGE", f"c{ino}_".encode() + i, 0, -1)
                                            for ino, idx in zip(inos, idxs) for i in idx]))
        return [[(i, [Slice.unpack(b) for b in next(lists)]) for i in idx] for idx in idxs]

    async def forget_chunks(self, done: list[tuple[int, list[bytes]]]) -> None:
        """Forget chunks whose data is gone: (inode, chunk indexes) each."""
        await self.r.pipeline([cmd for ino, idx in done if idx
                               for cmd in (("DEL", *[f"c{ino}_".encode() + i for i in idx]), ("ZREM", f"k{ino}", *idx))])

    async def forget_files(self, files: list[tuple[bytes, int]]) -> None:
        """The files' data is gone: drop their entries ((member, inode) each),
        except where chunks remain (a late commit), for the next pass."""
        left = await self.r.pipeline([("EXISTS", f"k{ino}") for _, ino in files])
        gone = [member for (member, _), n in zip(files, left) if not n]
        if gone:
            await self.r.execute("ZREM", "delfiles", *gone)

    async def take_cut_chunks(self, limit: int = 100) -> list[tuple[bytes, list[Slice]]]:
        """Claim up to `limit` chunk lists cut off by truncates: (key, slices).
        Popped, so two mounts never work on one; a crash in between leaves
        orphan objects (gc finds them), never a file pointing at deleted data."""
        keys = await self.r.execute("LPOP", "delchunks", limit) or []
        lists = await self.r.pipeline([("LRANGE", k, 0, -1) for k in keys])
        return [(k, [Slice.unpack(b) for b in raw]) for k, raw in zip(keys, lists)]

    async def forget_keys(self, keys: list[bytes]) -> None:
        if keys:
            await self.r.execute("DEL", *keys)

    async def compact_commit(self, ino: int, indx: int, old: list[bytes], new: list[Slice]) -> bool:
        """Replace the chunk's first len(old) slices, if they are still
        exactly `old`, by `new`; False if the chunk changed meanwhile."""
        return bool(await self._script(lua.COMPACT, [f"c{ino}_{indx}"],
                                       [len(old), b"".join(old), b"".join(s.pack() for s in new),
                                        int(time.time())]))

    async def read_chunk_raw(self, ino: int, indx: int) -> list[bytes]:
        return await self.r.execute("LRANGE", f"c{ino}_{indx}", 0, -1)

    async def compacted_due(self, before: float, limit: int = 100) -> list[bytes]:
        """Slices replaced by compactions before `before` (their grace is over)."""
        return await self.r.execute("ZRANGEBYSCORE", "compacted", "-inf", before, "LIMIT", 0, limit)

    async def forget_compacted(self, members: list[bytes]) -> None:
        if members:
            await self.r.execute("ZREM", "compacted", *members)

    async def unref(self, refs: list[tuple[int, str]]) -> list[int]:
        """Drop one reference to each slice, named by (slice id, which
        reference); the ids whose objects can go. Safe to run again."""
        if not refs:
            return []
        await self.r.execute("SCRIPT", "LOAD", lua.UNREF.source)
        last = await self.r.pipeline([("EVALSHA", lua.UNREF.sha, 0, sid, ref) for sid, ref in refs])
        return [sid for (sid, _), gone in zip(refs, last) if gone]

    async def take_slices(self, limit: int = 100) -> list[Slice]:
        """Claim queued slices (format 1 truncates queued slices, not chunks)."""
        return [Slice.unpack(b) for b in await self.r.execute("LPOP", "delslices", limit) or []]

    # ---- xattrs -----------------------------------------------------------
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        v = await self.r.execute("HGET", f"x{ino}", name)
        if v is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return v

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self.r.execute("HKEYS", f"x{ino}")

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self._script(lua.SETXATTR, [f"i{ino}", f"x{ino}"], [name, value, _now()])

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._script(lua.REMOVEXATTR, [f"i{ino}", f"x{ino}"], [name, _now()])

    # ---- statfs -----------------------------------------------------------
    async def statfs(self) -> tuple[int, int, int, int]:
        """(total bytes, used bytes, total inodes, used inodes)."""
        used, inodes = await self.r.pipeline([("GET", "usedSpace"), ("GET", "totalInodes")])
        used, inodes = max(0, int(used or 0)), int(inodes or 0)
        cap = self.capacity or max(1 << 50, used * 2)
        icap = int(self.settings.get("inodes", 0)) or max(10 << 20, inodes * 2)
        return cap, used, icap, inodes

    async def aclose(self):
        await self.r.aclose()


__all__ = ["Meta", "Attr", "Slice", "NotFormatted", "RedisUnavailable", "CHUNK_SIZE", "ROOT_INODE", "TYPES",
           "volume_settings"]
