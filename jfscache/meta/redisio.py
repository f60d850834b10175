"""A small Redis client for trio: pooled streams, hiredis parsing, pipelines, Lua.

Why not redis-py: its sync client blocks the event loop (every other FUSE
request stalls behind a Redis round trip) and its asyncio client under
trio-asyncio costs ~5x more per call (DESIGN.md, "Measured on this kind of
machine"). A trio stream with hiredis's Reader and pack_command is the only
option measured at JuiceFS's metadata rate. redis-py is still used to parse
URLs, so every URL form redis-py accepts works here too.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import socket
import ssl
import time

import hiredis
import trio
from redis.connection import parse_url

log = logging.getLogger(__name__)

# Commands whose second application changes what the first did. Anything else
# (reads, SET/HSET/ZADD/DEL/...) may be sent again when a reply was lost.
_NOT_IDEMPOTENT = {b"INCR", b"INCRBY", b"DECR", b"DECRBY", b"HINCRBY", b"LPOP", b"RPOP", b"RPUSH", b"LPUSH",
                   b"EVAL", b"EVALSHA"}


class RedisError(Exception):
    """An error reply from Redis (the message is Redis's own)."""


class RedisUnavailable(OSError):
    """Redis cannot be reached (or a mutation's reply was lost); the message
    says where and why, in one line. An OSError(EIO), so that a metadata
    operation that fails this way reaches the application as EIO."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return self.strerror


class RedisRefused(RedisUnavailable):
    """Redis answers but will not have us (wrong password, a certificate
    that does not verify): waiting would not help, so it is not retried."""


_READ_ONLY = {b"GET", b"HGET", b"HMGET", b"HGETALL", b"HKEYS", b"HLEN", b"HEXISTS", b"LRANGE", b"LLEN", b"ZRANGE",
              b"ZRANGEBYSCORE", b"ZSCORE", b"ZCARD", b"EXISTS", b"SCAN", b"PING", b"ROLE", b"INFO", b"SCRIPT"}


def _sentinels(url: str) -> tuple[str, list[tuple[str, int]]] | None:
    """A Sentinel URL, as JuiceFS writes them:
    redis://[:PASSWORD@]MASTER_NAME,HOST[:PORT][,HOST[:PORT]...][:PORT][/DB]
    -> (master name, sentinel addresses); None for a plain URL."""
    from urllib.parse import urlsplit
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    if "," not in netloc:
        return None
    parts = netloc.split(",")
    name, hosts = parts[0], parts[1:]
    default = 26379
    last_host, _, last_port = hosts[-1].rpartition(":")
    if last_host and last_port.isdigit():
        default = int(last_port)
    out = []
    for h in hosts:
        host, _, port = h.rpartition(":")
        out.append((host, int(port)) if host and port.isdigit() else (h, default))
    if not name or not out:
        raise ValueError("invalid Redis Sentinel URL (example: redis://mymaster,10.0.0.1,10.0.0.2:26379/1)")
    return name, out


def _parse(url: str) -> dict:
    """redis-py's URL parsing, minus its silence about a bad database number
    (it falls back to db 0, which would mount the wrong volume)."""
    from urllib.parse import parse_qs, urlsplit
    u = urlsplit(url)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"invalid Redis URL {url!r}: it must start with redis://, rediss:// or unix:// "
                         "(example: redis://host:6379/1)")
    for db in [u.path.strip("/")] if u.scheme != "unix" else []:
        if db and not db.isdigit():
            raise ValueError(f"invalid Redis URL: database {db!r} is not a number (example: redis://host:6379/1)")
    for db in parse_qs(u.query).get("db", []):
        if not db.isdigit():
            raise ValueError(f"invalid Redis URL: database {db!r} is not a number (example: redis://host:6379/1)")
    if _sentinels(url):
        # redis-py knows no Sentinel URLs: parse the rest with one sentinel as host.
        netloc = u.netloc
        auth, _, hosts = netloc.rpartition("@")
        url = u._replace(netloc=(auth + "@" if auth else "") + "sentinel").geturl()
    try:
        return parse_url(url)
    except ValueError as e:
        raise ValueError(f"invalid Redis URL: {e}") from None


def _tls_context(url: str) -> ssl.SSLContext | None:
    """For rediss:// URLs: TLS, verified against the system CAs or
    ?tls-ca-cert-file=, with a client certificate from ?tls-cert-file= and
    ?tls-key-file= (JuiceFS's query names); ?insecure-skip-verify=true
    turns verification off."""
    from urllib.parse import parse_qs, urlsplit
    u = urlsplit(url)
    if u.scheme != "rediss":
        return None
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    try:
        ctx = ssl.create_default_context(cafile=q.get("tls-ca-cert-file"))
        if q.get("tls-cert-file"):
            ctx.load_cert_chain(q["tls-cert-file"], q.get("tls-key-file"))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"invalid TLS settings in the Redis URL: {e}") from None
    if q.get("insecure-skip-verify", "").lower() in ("true", "1", "yes"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    opts = _parse(url)
    sentinel = _sentinels(url)
    if sentinel:
        return (f"master '{sentinel[0]}' of Sentinels {','.join(f'{h}:{p}' for h, p in sentinel[1])} "
                f"db {opts.get('db', 0)}")
    if opts.get("path"):
        return f"unix:{opts['path']} db {opts.get('db', 0)}"
    return f"{opts.get('host', 'localhost')}:{opts.get('port', 6379)} db {opts.get('db', 0)}"


class Script:
    """A Lua script run with EVALSHA, loaded on first NOSCRIPT. `idempotent`:
    running it twice leaves what running it once does (read-only scripts,
    and those whose second run finds the work done), so it may be sent
    again when its reply was lost; other scripts then fail with EIO."""

    def __init__(self, source: str, idempotent: bool = False, read_only: bool = False):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.idempotent = idempotent or read_only
        self.read_only = read_only


class _Conn:
    __slots__ = ("stream", "sock", "reader", "raw", "poller")

    def __init__(self, stream, sock=None):
        self.stream = stream
        self.sock = sock if sock is not None else stream.socket  # the TCP socket (under TLS, if any)
        self.reader = hiredis.Reader()
        # Without TLS, round trips use the stdlib socket under trio's (it is
        # non-blocking): trio's send_all and receive_some add a second yield
        # to the scheduler, a failed first recv and their bookkeeping, a
        # fifth to two fifths of a round trip's CPU here (a GET in a loop:
        # 60-64 us before, 32-53 us after, in two sessions).
        self.raw = getattr(self.sock, "_sock", None) if isinstance(stream, trio.SocketStream) else None
        # alive() asks this first: a poll that finds nothing to read costs
        # ~1 us, a peek that raises BlockingIOError ~5 us, on every request.
        self.poller = None
        if getattr(self.sock, "_sock", None) is not None:
            self.poller = select.poll()
            self.poller.register(self.sock._sock, select.POLLIN)

    def alive(self) -> bool:
        """False if Redis closed this idle connection (e.g. it restarted):
        a peek that finds EOF or an error. A request is never sent on such a
        connection, so a lost reply really means Redis may have acted."""
        if self.poller is None or not self.poller.poll(0):
            return True  # nothing to read, no EOF, no error: the normal state
        try:
            return self.sock._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # the stdlib socket
        except BlockingIOError:
            return True  # nothing to read: the normal state of an idle connection
        except OSError:
            return False

    def close(self) -> None:
        # Closing a trio socket needs no await; streams' aclose only adds a checkpoint.
        self.sock.close()

    async def roundtrip(self, packed: bytes, n: int) -> list:
        raw = self.raw
        if raw is None:
            await self.stream.send_all(packed)
        else:
            try:
                sent = raw.send(packed)
            except BlockingIOError:
                sent = 0
            if sent < len(packed):  # a full send buffer: trio waits for room
                await self.stream.send_all(memoryview(packed)[sent:])
        out = []
        reader = self.reader
        while len(out) < n:
            reply = reader.gets()
            if reply is False:
                if raw is None:
                    data = await self.stream.receive_some(1 << 20)
                else:
                    # A yield first: by the time the scheduler comes back,
                    # the reply is usually there, and needs no epoll wait.
                    await trio.lowlevel.checkpoint()
                    while True:
                        try:
                            data = raw.recv(1 << 20)
                            break
                        except BlockingIOError:
                            await trio.lowlevel.wait_readable(raw)
                if not data:
                    raise ConnectionResetError("connection closed by Redis")
                reader.feed(data)
                continue
            out.append(reply)
        return out


class Redis:
    """A pool of connections to one Redis database."""

    def __init__(self, url: str, max_idle: int = 32, connect_timeout: float = 5.0, timeout: float = 5.0):
        self.url = url
        self.where = describe(url)
        opts = _parse(url)
        self._path = opts.get("path")
        self._host = opts.get("host", "localhost")
        self._port = int(opts.get("port", 6379))
        self._db = int(opts.get("db", 0) or 0)
        self._username = opts.get("username")
        # META_PASSWORD (as JuiceFS names it) keeps the password out of the
        # URL, and so out of ps, shell history and unit files.
        self._password = os.environ.get("META_PASSWORD") or opts.get("password")
        self._tls = _tls_context(url)
        self._sentinel = _sentinels(url)
        self._master_addr: tuple[str, int] | None = None  # the last one connected to, for the log
        # Strict mode (--meta-wait-replicas): each mutation is followed, in
        # the same round trip, by WAIT for this many replicas.
        self.wait_replicas = 0
        self.wait_ms = 1000
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        # How long an operation keeps trying while Redis is unreachable
        # before it fails (EIO): short for the CLI, --meta-timeout in a mount.
        self.timeout = timeout
        self._down_since: float | None = None

    async def _connect(self) -> _Conn:
        try:
            with trio.fail_after(max(0.1, min(self._connect_timeout, self.timeout))):
                if self._path:
                    stream = await trio.open_unix_socket(self._path)
                else:
                    host, port = await self._master() if self._sentinel else (self._host, self._port)
                    stream = await trio.open_tcp_stream(host, port)
                    stream.setsockopt(6, 1, 1)  # TCP_NODELAY: requests are tiny and latency-bound
                sock = stream.socket
                if self._tls is not None:
                    stream = trio.SSLStream(stream, self._tls, server_hostname=host)
                    await stream.do_handshake()
                conn = _Conn(stream, sock)
                setup = []
                if self._password:
                    auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                    setup.append(auth)
                if self._db:
                    setup.append(("SELECT", self._db))
                if self._sentinel:
                    setup.append(("ROLE",))
                if setup:
                    replies = await conn.roundtrip(b"".join(hiredis.pack_command(c) for c in setup), len(setup))
                    for r in replies:
                        if isinstance(r, hiredis.ReplyError):
                            await stream.aclose()
                            transient = str(r).startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"))
                            raise (RedisUnavailable if transient else RedisRefused)(
                                f"Redis at {self.where} refused the connection: {r}")
                    if self._sentinel and replies[-1][0] != b"master":
                        # A failover in progress: the Sentinels still name a replica.
                        await stream.aclose()
                        raise RedisUnavailable(f"Redis at {self.where}: the Sentinels' master is a replica now")
                if self._sentinel:
                    if await self._master() != (host, port):
                        # Asked again once connected: a failover that completed
                        # in between would leave us on the old master, which,
                        # restarted, answers ROLE as a master (stale or empty)
                        # for ~10 s until the Sentinels make it a replica.
                        await stream.aclose()
                        raise RedisUnavailable(f"Redis at {self.where}: the Sentinels moved the master "
                                               f"away from {host}:{port} while we connected")
                    if (host, port) != self._master_addr:
                        log.log(logging.INFO if self._master_addr is None else logging.WARNING,
                                "Redis master '%s' is at %s:%d", self._sentinel[0], host, port)
                        self._master_addr = (host, port)
                return conn
        except trio.TooSlowError:
            raise RedisUnavailable(f"Redis at {self.where} does not answer (timed out after {self._connect_timeout:g} s)") from None
        except RedisUnavailable:
            raise
        except OSError as e:
            raise RedisUnavailable(f"cannot connect to Redis at {self.where}: {e.strerror or e}") from None
        except trio.BrokenResourceError as e:  # TLS: the handshake failed (cause: the ssl error)
            cls = RedisRefused if isinstance(e.__cause__, ssl.SSLCertVerificationError) else RedisUnavailable
            raise cls(f"TLS connection to Redis at {self.where} failed: {e.__cause__ or e}") from None

    async def _master(self) -> tuple[str, int]:
        """The master's address by the Sentinels' newest configuration: all
        are asked, and the answer with the highest config epoch wins, so a
        Sentinel that missed a failover cannot send us to the old master
        (which, restarted, may answer ROLE as a master with stale data)."""
        name, sentinels = self._sentinel
        best, errors = None, []
        for host, port in sentinels:
            try:
                with trio.fail_after(1):
                    stream = await trio.open_tcp_stream(host, port)
                    try:
                        (info,) = await _Conn(stream).roundtrip(hiredis.pack_command(("SENTINEL", "MASTER", name)), 1)
                    finally:
                        await stream.aclose()
                if isinstance(info, list):
                    f = dict(zip(info[0::2], info[1::2]))
                    cand = (int(f.get(b"config-epoch", 0)), f[b"ip"].decode(), int(f[b"port"]))
                    best = cand if best is None or cand[0] > best[0] else best
                else:
                    errors.append(f"{host}:{port} does not know master '{name}'")
            except (OSError, trio.TooSlowError, KeyError, ValueError) as e:
                errors.append(f"{host}:{port}: {getattr(e, 'strerror', None) or e or 'timed out'}")
        if best is None:
            raise OSError(errno.EHOSTUNREACH, "no Sentinel answered: " + "; ".join(errors))
        return best[1], best[2]

    def _outage(self, e: Exception) -> None:
        """One log line per outage, not one per operation."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis at %s is unreachable (%s); metadata operations wait up to %g s for it, "
                        "then fail with EIO", self.where, e, self.timeout)

    def _back(self) -> None:
        if self._down_since is not None:
            log.warning("Redis at %s is reachable again (after %.1f s)", self.where,
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _drop_idle(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()

    async def _run(self, packed: bytes, n: int, resend: bool, mutates: bool = False) -> list:
        """Send, read n replies. Failures to connect are retried until the
        timeout. A connection that breaks after the request went out is
        retried only when `resend`: Redis may have applied it, and a second
        INCR or script run would apply it twice."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        wait = mutates and self.wait_replicas > 0
        if wait:
            packed += hiredis.pack_command(("WAIT", self.wait_replicas, self.wait_ms))
            n += 1
        while True:
            conn = None
            while self._idle:
                c = self._idle.pop()
                if c.alive():
                    conn = c
                    break
                c.close()  # closed by Redis (a restart): nothing was sent on it
            try:
                if conn is None:
                    conn = await self._connect()
            except RedisUnavailable as e:
                self._outage(e)
                if isinstance(e, RedisRefused) or time.monotonic() + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            try:
                replies = await conn.roundtrip(packed, n)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                conn.close()
                self._drop_idle()
                self._outage(e)
                if not resend:
                    raise RedisUnavailable(f"lost the connection to Redis at {self.where} before its reply "
                                           "(the change may or may not have been applied)") from None
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"lost the connection to Redis at {self.where}: {e}") from None
                continue
            except BaseException:
                # A connection interrupted mid-reply has unread bytes: never reuse it.
                conn.close()
                raise
            if any(isinstance(r, hiredis.ReplyError) and str(r).startswith(("READONLY", "LOADING"))
                   for r in replies):
                # A replica (after a failover) or a Redis still loading its data:
                # nothing was applied, so trying again is safe for any command.
                conn.close()
                self._drop_idle()
                self._outage(RedisError(str(next(r for r in replies if isinstance(r, hiredis.ReplyError)))))
                if time.monotonic() + delay > deadline:
                    raise RedisUnavailable(f"Redis at {self.where} is not a writable master")
                await trio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            self._back()
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
            else:
                conn.close()
            if wait:
                acked = replies.pop()
                if isinstance(acked, int) and acked < self.wait_replicas:
                    raise RedisUnavailable(f"a change was applied on the Redis master but only {acked} of "
                                           f"{self.wait_replicas} replicas confirmed it within {self.wait_ms} ms")
            return replies

    async def execute(self, *args):
        (reply,) = await self._run(hiredis.pack_command(args), 1, _resendable(args), _mutates(args))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    async def pipeline(self, commands: list[tuple]) -> list:
        """Send several commands in one round trip; error replies are raised."""
        if not commands:
            return []
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        replies = await self._run(packed, len(commands), all(map(_resendable, commands)),
                                  any(map(_mutates, commands)))
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise RedisError(str(r))
        return replies

    async def read_many(self, cmd: "KeyedCommand", keys: list[bytes]) -> list:
        """The same read-only command on many keys, in one round trip;
        error replies are raised."""
        if not keys:
            return []
        replies = await self._run(b"".join(map(cmd.pack, keys)), len(keys), True, False)
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise RedisError(str(r))
        return replies

    async def eval(self, script: Script, keys: list, args: list):
        cmd = ("EVALSHA", script.sha, len(keys), *keys, *args)
        mutates = not script.read_only
        (reply,) = await self._run(hiredis.pack_command(cmd), 1, script.idempotent, mutates)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            await self.execute("SCRIPT", "LOAD", script.source)
            (reply,) = await self._run(hiredis.pack_command(cmd), 1, script.idempotent, mutates)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    async def aclose(self):
        self._drop_idle()


class KeyedCommand:
    """A read-only command whose arguments after the key never change (an
    HMGET of the attribute fields), packed once: per key 0.6 us, against
    3.1 us through hiredis.pack_command, where a listing's whole attribute
    fetch took 13-15 us per entry."""

    def __init__(self, name: str, *tail: str):
        if name.upper().encode() not in _READ_ONLY:
            raise ValueError(f"{name} is not a read-only command")
        self._head = b"*%d\r\n$%d\r\n%s\r\n" % (len(tail) + 2, len(name), name.encode())
        self._tail = b"".join(b"$%d\r\n%s\r\n" % (len(t), t.encode()) for t in tail)

    def pack(self, key: bytes) -> bytes:
        return b"%s$%d\r\n%s\r\n%s" % (self._head, len(key), key, self._tail)


def _name(cmd: tuple) -> bytes:
    return (cmd[0] if isinstance(cmd[0], bytes) else str(cmd[0]).encode()).upper()


def _resendable(cmd: tuple) -> bool:
    return _name(cmd) not in _NOT_IDEMPOTENT


def _mutates(cmd: tuple) -> bool:
    return _name(cmd) not in _READ_ONLY

