"""A small Redis client for trio: pooled streams, hiredis parsing, pipelines, Lua.

Why not redis-py: its sync client blocks the event loop (every other FUSE
request stalls behind a Redis round trip) and its asyncio client under
trio-asyncio costs ~5x more per call (DESIGN.md, "Measured on this kind of
machine"). A trio stream with hiredis's Reader and pack_command is the only
option measured at JuiceFS's metadata rate. redis-py is still used to parse
URLs, so every URL form redis-py accepts works here too.
"""
from __future__ import annotations

import hashlib

import hiredis
import trio
from redis.connection import parse_url


class RedisError(Exception):
    """An error reply from Redis (the message is Redis's own)."""


class RedisUnavailable(Exception):
    """Redis cannot be reached; the message says where and why, in one line."""


def _parse(url: str) -> dict:
    """redis-py's URL parsing, minus its silence about a bad database number
    (it falls back to db 0, which would mount the wrong volume)."""
    from urllib.parse import parse_qs, urlsplit
    u = urlsplit(url)
    for db in [u.path.strip("/")] if u.scheme != "unix" else []:
        if db and not db.isdigit():
            raise ValueError(f"invalid Redis URL: database {db!r} is not a number (example: redis://host:6379/1)")
    for db in parse_qs(u.query).get("db", []):
        if not db.isdigit():
            raise ValueError(f"invalid Redis URL: database {db!r} is not a number (example: redis://host:6379/1)")
    try:
        return parse_url(url)
    except ValueError as e:
        raise ValueError(f"invalid Redis URL: {e}") from None


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    opts = _parse(url)
    if opts.get("path"):
        return f"unix:{opts['path']} db {opts.get('db', 0)}"
    return f"{opts.get('host', 'localhost')}:{opts.get('port', 6379)} db {opts.get('db', 0)}"


class Script:
    """A Lua script run with EVALSHA, loaded on first NOSCRIPT."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Conn:
    __slots__ = ("stream", "reader")

    def __init__(self, stream):
        self.stream = stream
        self.reader = hiredis.Reader()

    async def roundtrip(self, packed: bytes, n: int) -> list:
        await self.stream.send_all(packed)
        out = []
        reader = self.reader
        while len(out) < n:
            reply = reader.gets()
            if reply is False:
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    raise ConnectionResetError("connection closed by Redis")
                reader.feed(data)
                continue
            out.append(reply)
        return out


class Redis:
    """A pool of connections to one Redis database."""

    def __init__(self, url: str, max_idle: int = 32, connect_timeout: float = 5.0):
        self.url = url
        self.where = describe(url)
        opts = _parse(url)
        self._path = opts.get("path")
        self._host = opts.get("host", "localhost")
        self._port = int(opts.get("port", 6379))
        self._db = int(opts.get("db", 0) or 0)
        self._username = opts.get("username")
        self._password = opts.get("password")
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout

    async def _connect(self) -> _Conn:
        try:
            with trio.fail_after(self._connect_timeout):
                if self._path:
                    stream = await trio.open_unix_socket(self._path)
                else:
                    stream = await trio.open_tcp_stream(self._host, self._port)
                    stream.setsockopt(6, 1, 1)  # TCP_NODELAY: requests are tiny and latency-bound
                conn = _Conn(stream)
                setup = []
                if self._password:
                    auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                    setup.append(auth)
                if self._db:
                    setup.append(("SELECT", self._db))
                if setup:
                    replies = await conn.roundtrip(b"".join(hiredis.pack_command(c) for c in setup), len(setup))
                    for r in replies:
                        if isinstance(r, hiredis.ReplyError):
                            await stream.aclose()
                            raise RedisUnavailable(f"Redis at {self.where} refused the connection: {r}")
                return conn
        except trio.TooSlowError:
            raise RedisUnavailable(f"Redis at {self.where} does not answer (timed out after {self._connect_timeout:g} s)") from None
        except OSError as e:
            raise RedisUnavailable(f"cannot connect to Redis at {self.where}: {e.strerror or e}") from None

    async def _run(self, packed: bytes, n: int) -> list:
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            replies = await conn.roundtrip(packed, n)
        except BaseException:
            # A connection interrupted mid-reply has unread bytes: never reuse it.
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()
            raise
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await conn.stream.aclose()
        return replies

    async def _run_retry(self, packed: bytes, n: int) -> list:
        # One retry on a fresh connection covers a Redis restart or an idle
        # connection closed by a proxy; anything else surfaces to the caller.
        try:
            return await self._run(packed, n)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            for c in self._idle:
                await c.stream.aclose()
            self._idle.clear()
            try:
                return await self._run(packed, n)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise RedisUnavailable(f"lost the connection to Redis at {self.where}: {e}") from None

    async def execute(self, *args):
        (reply,) = await self._run_retry(hiredis.pack_command(args), 1)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    async def pipeline(self, commands: list[tuple]) -> list:
        """Send several commands in one round trip; error replies are raised."""
        if not commands:
            return []
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        replies = await self._run_retry(packed, len(commands))
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise RedisError(str(r))
        return replies

    async def eval(self, script: Script, keys: list, args: list):
        cmd = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = await self._run_retry(hiredis.pack_command(cmd), 1)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            await self.execute("SCRIPT", "LOAD", script.source)
            (reply,) = await self._run_retry(hiredis.pack_command(cmd), 1)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    async def aclose(self):
        for c in self._idle:
            await c.stream.aclose()
        self._idle.clear()

