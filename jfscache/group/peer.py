"""The peer protocol of a cache group: one member asks the owner of a block for it.

A small framed protocol over TCP on trio. Every connection starts with a
mutual challenge-response on the group's secret (HMAC-SHA256), so only holders
of the volume's credentials are served, and a requester never trusts an
impostor. After that, a connection carries one request at a time:

    request:  header, key bytes, payload (a newline-joined key list, or empty)
    response: header, payload (block bytes, a bitmap, or an error message)

The header is fixed-size (see ``_HEADER``) and every length in it is checked
against a bound before anything is read, so a garbage or hostile peer cannot
make either side allocate without limit. Each payload travels with its xxh64
(a request's covers its key too), and a block response echoes the hash of the
key the server served, so a flipped byte in the block or in the request's key
makes the requester raise rather than return wrong bytes. The payload's
checksum is plain xxh64 of the bytes, so a source that already stores one
(the disk tier's index) could send it instead of hashing again.

The requester (``PeerClient``) treats a peer as an optimisation: every request
is bounded by a deadline (connect included), any failure raises ``PeerError``
(the caller reads from the object store instead), and a peer that failed is
skipped for a back-off period without even connecting, so a dead or stalled
member costs one timeout, not one per read.

The server (``open_peer_server``) serves from a ``BlockSource`` (the block
cache), one task per connection in a nursery it owns. Errors of the source
become an error response; anything else a connection does wrong closes that
connection only.

This module imports nothing from the rest of jfscache: the block cache is
reached only through ``BlockSource``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import struct
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Protocol

import trio
import xxhash

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# wire format

# magic, version, op, status, flags, key length, payload length, a, b, xxh64.
# a and b are per-op integers: a request's (offset, length) of a get, the
# number of keys of a list; a response's (block size, key hash) of a get,
# (block size, was-cached) of a warm, the number of keys evicted.
_HEADER = struct.Struct("!2sBBBBHIqqQ")
MAGIC = b"JP"
VERSION = 1

# Connection greeting from the server: protocol name + its nonce.
_HELLO = b"JFSPEER1"
NONCE_LEN = 16
MAC_LEN = 32
_AUTH_OK = b"\x00"
_AUTH_DENIED = b"\x01"

OP_GET = 1
OP_WARM = 2
OP_CHECK = 3
OP_EVICT = 4
_OP_NAMES = {OP_GET: "get", OP_WARM: "warm", OP_CHECK: "check", OP_EVICT: "evict"}

FLAG_FILL = 1  # get: the owner fetches from the object store on a miss

ST_OK = 0
ST_MISS = 1          # get without fill: the peer does not hold the block
ST_ERROR = 2         # the source failed (payload: message)
ST_BAD_REQUEST = 3   # well-framed but invalid request (payload: message)

# Bounds checked before reading: a block is 4 MiB by default, so 64 MiB is
# generous; requests only carry key lists, which clients send in batches.
MAX_KEY = 1024
MAX_PAYLOAD = 64 << 20
MAX_REQUEST_PAYLOAD = 1 << 20
LIST_BATCH_BYTES = 256 << 10
MAX_ERROR_MESSAGE = 512

# Server-side deadlines: a connection that does not authenticate, sits idle,
# or trickles a request or a response is dropped so it cannot hold a task and
# a block in memory for ever. The client drops its own idle connections
# earlier than the server does, and retries once on a fresh connection if a
# reused one turns out to be closed.
HANDSHAKE_TIMEOUT = 10.0
SERVER_IDLE_TIMEOUT = 300.0
SERVER_IO_TIMEOUT = 60.0
CLIENT_IDLE_MAX = 60.0

# Per peer: at most this many connections (= concurrent requests) at a time.
MAX_CONNECTIONS_PER_PEER = 16

_RECV_CHUNK = 65536
# A client keeps a few receive buffers for large payloads: receiving into
# memory already mapped, then one copy into the bytes returned, costs ~0.15 s
# of CPU per GiB less than a fresh buffer per block.
_SCRATCH_KEEP = 4
_SCRATCH_MAX = 8 << 20
_SMALL = 65536  # payloads up to this size are joined with their header in one send


class PeerError(Exception):
    """A peer could not serve a request (down, slow, refused, bad checksum,
    auth failed). Callers fall back to the object store.

    ``remote`` is True when the peer itself answered with an error (its
    source failed, or it found the request invalid): the peer is up, so that
    does not put it in back-off.
    """

    def __init__(self, message: str, *, addr: str | None = None, remote: bool = False):
        super().__init__(message)
        self.addr = addr
        self.remote = remote


class BlockSource(Protocol):
    """What the server serves from; the block cache implements it."""

    async def local(self, key: str) -> bytes | None:
        """This node's own tiers only (memory, disk); never fetches."""

    async def fill(self, key: str) -> bytes:
        """Own tiers, else fetch once from the object store (the source shares
        concurrent fetches), cache, return; raises on failure."""

    def contains(self, key: str) -> bool: ...

    def evict(self, key: str) -> None: ...


# ---------------------------------------------------------------------------
# framing, shared by both ends

class _Failure(Exception):
    """The connection is unusable (EOF, garbage, bad checksum, auth)."""


class _Closed(_Failure):
    """The other end closed the connection."""


class _ProtocolError(_Failure):
    """The other end sent something that is not this protocol."""


class _ChecksumError(_ProtocolError):
    pass


class _AuthError(_Failure):
    pass


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the peer secret must be non-empty bytes")


def _encode_key(key: str) -> bytes:
    b = key.encode()
    if not b or len(b) > MAX_KEY or b"\n" in b:
        raise ValueError(f"invalid block key {key[:80]!r}: 1..{MAX_KEY} bytes, no newline")
    return b


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"peer address must be host:port, not {addr!r}")
    return host.strip("[]"), int(port)


def _request_checksum(key: bytes, payload: bytes) -> int:
    return xxhash.xxh64_intdigest(key + payload)     # both small


def _payload_checksum(payload: Any) -> int:
    return xxhash.xxh64_intdigest(payload)


def _key_hash(key: bytes) -> int:
    # echoed in a block response (a signed 64-bit field): the server says
    # which key it served, and the requester checks it is the one it asked for
    return xxhash.xxh64_intdigest(key) >> 1


class _Conn:
    """A SocketStream (or a TLS stream over one) with a small receive
    buffer; one request at a time."""

    __slots__ = ("stream", "sock", "tls", "buf", "received", "idle_since")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream, tcp: trio.SocketStream | None = None):
        self.stream = stream
        # Plain TCP moves large payloads with recv_into/sendmsg on the socket
        # itself (no copies); under TLS every byte goes through the stream.
        self.tls = tcp is not None
        self.sock = (tcp or stream).socket
        self.buf = bytearray()
        self.received = 0          # bytes received since the caller reset it
        self.idle_since = 0.0

    def close(self) -> None:
        # SocketStream.aclose() is just this plus a checkpoint; closing
        # synchronously lets pool bookkeeping run without awaiting.
        self.sock.close()

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(_RECV_CHUNK)
            if not data:
                raise _Closed("connection closed by peer")
            self.received += len(data)
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_header(self, *, eof_ok: bool = False) -> tuple | None:
        if eof_ok and not self.buf:
            data = await self.stream.receive_some(_RECV_CHUNK)
            if not data:
                return None
            self.received += len(data)
            self.buf += data
        return _HEADER.unpack(await self.read_exact(_HEADER.size))

    async def read_payload(self, n: int, scratch: list[bytearray] | None = None) -> bytes:
        """n bytes. Large ones are received straight into one buffer (a
        reusable one from ``scratch`` if given), with no chunks to join, then
        copied once into the bytes returned."""
        if n <= _SMALL:
            return await self.read_exact(n)
        buf = scratch.pop() if scratch else None
        if buf is None or len(buf) < n:
            buf = bytearray(n)
        view = memoryview(buf)[:n]
        got = min(n, len(self.buf))
        if got:
            view[:got] = self.buf[:got]
            del self.buf[:got]
        while got < n:
            if self.tls:
                data = await self.stream.receive_some(n - got)
                k = len(data)
                view[got:got + k] = data
            else:
                k = await self.sock.recv_into(view[got:], n - got)
            if not k:
                raise _Closed("connection closed by peer")
            got += k
            self.received += k
        out = bytes(view)
        view.release()
        if scratch is not None and len(scratch) < _SCRATCH_KEEP and len(buf) <= _SCRATCH_MAX:
            scratch.append(buf)
        return out

    async def send(self, header: bytes, key: bytes = b"", payload: Any = b"") -> None:
        if len(payload) <= _SMALL:
            await self.stream.send_all(b"".join((header, key, payload)))
            return
        # Header and payload in one sendmsg, then the rest of the payload
        # from memoryview slices: a large block is never copied in Python.
        head = header + key
        payload = memoryview(payload)
        if self.tls:
            await self.stream.send_all(head)
            await self.stream.send_all(payload)
            return
        sent = await self.sock.sendmsg([head, payload])
        if sent < len(head):
            await self.stream.send_all(head[sent:])
            sent = len(head)
        if sent - len(head) < len(payload):
            await self.stream.send_all(payload[sent - len(head):])


def tls_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for mutual TLS between members: each side
    shows its certificate and accepts only ones the group's CA signed.
    Host names are not checked (members are addressed by IP; the CA is the
    group's own); the group secret's handshake still runs inside."""
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        client.check_hostname = False
        client.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot use the cache group's TLS files ({cert}, {key}, {ca}): {e}") from None
    return server, client


def _set_nodelay(stream: trio.SocketStream) -> None:
    # trio sets it on TCP streams already; be explicit, requests are small.
    try:
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
    except OSError:
        pass


async def _client_handshake(conn: _Conn, secret: bytes) -> None:
    hello = await conn.read_exact(len(_HELLO) + NONCE_LEN)
    if hello[: len(_HELLO)] != _HELLO:
        raise _ProtocolError("not a jfscache peer (bad greeting)")
    server_nonce = hello[len(_HELLO):]
    client_nonce = os.urandom(NONCE_LEN)
    await conn.stream.send_all(client_nonce + _mac(secret, b"client", server_nonce, client_nonce))
    verdict = await conn.read_exact(1)
    if verdict == _AUTH_DENIED:
        raise _AuthError("peer refused our credentials (wrong group secret?)")
    if verdict != _AUTH_OK:
        raise _ProtocolError("bad handshake reply")
    proof = await conn.read_exact(MAC_LEN)
    if not hmac.compare_digest(proof, _mac(secret, b"server", client_nonce, server_nonce)):
        raise _AuthError("peer failed to prove it holds the group secret")


# ---------------------------------------------------------------------------
# server

@dataclass
class ServedCounters:
    requests: int = 0       # requests answered (any status)
    bytes: int = 0          # block bytes sent
    auth_failures: int = 0  # connections that failed the challenge
    errors: int = 0         # error responses and connections dropped for protocol errors
    connections: int = 0    # connections that authenticated


class PeerServer:
    """Serves blocks of ``source`` to authenticated peers; made by ``open_peer_server``."""

    def __init__(self, host: str, secret: bytes, source: BlockSource, stats: Any = None,
                 tls: ssl.SSLContext | None = None):
        self.host = host
        self.port = 0
        self.served = ServedCounters()
        self._secret = bytes(secret)
        self._source = source
        self._stats = stats   # anything with add(name, n), e.g. jfscache.metrics.Metrics.peer_served
        self._tls = tls  # server side of mutual TLS (tls_contexts), or plain TCP

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _count(self, name: str, n: int = 1) -> None:
        setattr(self.served, name, getattr(self.served, name) + n)
        if self._stats is not None:
            try:
                self._stats.add(f"peer_served_{name}", n)
            except Exception:  # metrics must never break serving
                log.exception("peer server: stats.add failed")

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Everything is caught here: an exception escaping a handler would
        # cancel serve_tcp's nursery and with it every other connection.
        conn = _Conn(stream)
        try:
            _set_nodelay(stream)
            authenticated = False
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                if self._tls is not None:
                    tls = trio.SSLStream(stream, self._tls, server_side=True)
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError as e:  # no certificate the group's CA signed, or no TLS
                        self._count("auth_failures")
                        log.warning("peer server: TLS handshake with %s failed: %s", _peer_of(stream),
                                    e.__cause__ or e)
                        return
                    conn = _Conn(tls, stream)
                authenticated = await self._handshake(conn)
            if authenticated:
                self._count("connections")
                await self._serve(conn)
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                ConnectionError) as e:
            log.debug("peer server: connection ended: %r", e)
        except _ProtocolError as e:
            self._count("errors")
            log.warning("peer server: dropping connection from %s: %s", _peer_of(stream), e)
        except Exception:
            self._count("errors")
            log.exception("peer server: unexpected error on a connection from %s", _peer_of(stream))
        finally:
            conn.close()

    async def _handshake(self, conn: _Conn) -> bool:
        server_nonce = os.urandom(NONCE_LEN)
        await conn.stream.send_all(_HELLO + server_nonce)
        reply = await conn.read_exact(NONCE_LEN + MAC_LEN)
        client_nonce, mac = reply[:NONCE_LEN], reply[NONCE_LEN:]
        if not hmac.compare_digest(mac, _mac(self._secret, b"client", server_nonce, client_nonce)):
            self._count("auth_failures")
            log.warning("peer server: authentication failed from %s", _peer_of(conn.stream))
            try:
                await conn.stream.send_all(_AUTH_DENIED)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return False
        await conn.stream.send_all(
            _AUTH_OK + _mac(self._secret, b"server", client_nonce, server_nonce))
        return True

    async def _serve(self, conn: _Conn) -> None:
        while True:
            request = None
            # One scope (they cost per request): first the idle deadline, then,
            # once a header came, the deadline to receive the rest.
            with trio.CancelScope(deadline=trio.current_time() + SERVER_IDLE_TIMEOUT) as scope:
                head = await conn.read_header(eof_ok=True)
                if head is not None:
                    scope.deadline = trio.current_time() + SERVER_IO_TIMEOUT
                    request = await self._read_request(conn, head)
            if request is None:
                return      # the client closed or idled between requests, or trickled one
            op, flags, key, payload, a, b = request
            status, ra, rb, body = await self._dispatch(op, flags, key, payload, a, b)
            self._count("requests")
            if status in (ST_ERROR, ST_BAD_REQUEST):
                self._count("errors")
            header = _HEADER.pack(MAGIC, VERSION, op, status, 0, 0, len(body), ra, rb,
                                  _payload_checksum(body))
            with trio.fail_after(SERVER_IO_TIMEOUT):
                await conn.send(header, b"", body)
            if status == ST_OK and op == OP_GET:
                self._count("bytes", len(body))

    async def _read_request(self, conn: _Conn, head: tuple):
        magic, version, op, _status, flags, key_len, plen, a, b, checksum = head
        if magic != MAGIC or version != VERSION:
            raise _ProtocolError(f"bad magic/version {magic!r}/{version}")
        if key_len > MAX_KEY:
            raise _ProtocolError(f"key length {key_len} > {MAX_KEY}")
        if plen > MAX_REQUEST_PAYLOAD:
            raise _ProtocolError(f"request payload {plen} > {MAX_REQUEST_PAYLOAD}")
        key = await conn.read_exact(key_len)
        payload = await conn.read_exact(plen)
        if _request_checksum(key, payload) != checksum:
            raise _ChecksumError("request checksum mismatch")
        return op, flags, key, payload, a, b

    async def _dispatch(self, op: int, flags: int, key: bytes, payload: bytes, a: int, b: int):
        """Returns (status, a, b, body). The source's exceptions become ST_ERROR."""
        try:
            if op in (OP_GET, OP_WARM):
                try:
                    skey = key.decode()
                except UnicodeDecodeError:
                    return _bad("key is not UTF-8")
                if not skey:
                    return _bad("empty key")
                if op == OP_WARM:
                    cached = self._source.contains(skey)
                    # A source may offer warm(): fill and wait until the block
                    # is on its disk tier, not just queued for it.
                    data = await getattr(self._source, "warm", self._source.fill)(skey)
                    return ST_OK, memoryview(data).nbytes, int(cached), b""
                if flags & FLAG_FILL:
                    data = await self._source.fill(skey)
                else:
                    data = await self._source.local(skey)
                    if data is None:
                        return ST_MISS, 0, 0, b""
                view = memoryview(data).cast("B")
                size = len(view)
                if a < 0 or a > size or b < -1:
                    return _bad(f"range ({a}, {b}) outside a block of {size} bytes")
                end = size if b < 0 else min(size, a + b)
                if end - a > MAX_PAYLOAD:
                    return _bad(f"range of {end - a} bytes exceeds {MAX_PAYLOAD}")
                return ST_OK, size, _key_hash(key), view[a:end]
            if op in (OP_CHECK, OP_EVICT):
                keys = payload.split(b"\n") if a > 0 else []
                if len(keys) != a:
                    return _bad(f"key list holds {len(keys)} keys, header says {a}")
                try:
                    skeys = [k.decode() for k in keys]
                except UnicodeDecodeError:
                    return _bad("key is not UTF-8")
                if op == OP_CHECK:
                    return ST_OK, 0, 0, bytes(bool(self._source.contains(k)) for k in skeys)
                n = 0
                for k in skeys:
                    if self._source.contains(k):
                        self._source.evict(k)
                        n += 1
                return ST_OK, n, 0, b""
            return _bad(f"unknown op {op}")
        except Exception as e:
            log.info("peer server: %s %r failed: %r", _OP_NAMES.get(op, op), key[:80], e)
            return ST_ERROR, 0, 0, _message(e)


def _bad(message: str):
    return ST_BAD_REQUEST, 0, 0, message.encode()[:MAX_ERROR_MESSAGE]


def _message(e: BaseException) -> bytes:
    return f"{type(e).__name__}: {e}".encode(errors="replace")[:MAX_ERROR_MESSAGE]


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "?"


@asynccontextmanager
async def open_peer_server(host: str, port: int, secret: bytes, source: BlockSource, *,
                           stats: Any = None, tls: ssl.SSLContext | None = None) -> AsyncIterator[PeerServer]:
    """Listen on host:port (port 0 picks a free one) and serve ``source`` to
    peers that hold ``secret`` until the block exits. ``stats``, if given,
    gets ``add("peer_served_<counter>", n)`` beside ``server.served``."""
    _check_secret(secret)
    server = PeerServer(host, secret, source, stats, tls)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, server._handle, port, host=host, handler_nursery=nursery))
        server.port = listeners[0].socket.getsockname()[1]
        log.info("peer server listening on %s", server.address)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# client

class PeerClient:
    """Requests blocks from peers, over a small pool of authenticated
    connections per peer (idle ones reused, at most ``max_idle_per_peer``
    kept, at most ``max_connections_per_peer`` requests in flight).

    Every method raises PeerError on failure, each request bounded by
    ``timeout`` seconds, connect included. A failure of the peer or of the
    connection (refused, timed out, closed, bad checksum, authentication)
    puts the address in back-off for ``backoff`` seconds, during which
    requests to it raise at once without connecting. An error the peer
    answered with (its object-store fetch failed, an invalid range) does not:
    the peer is up, and the PeerError says ``remote``. A connection that
    failed or was cancelled mid-request is closed, never reused.
    """

    max_connections_per_peer = MAX_CONNECTIONS_PER_PEER

    def __init__(self, secret: bytes, *, timeout: float = 5.0, backoff: float = 10.0,
                 max_idle_per_peer: int = 4, fill_timeout: float = 30.0, tls: ssl.SSLContext | None = None):
        _check_secret(secret)
        self._secret = bytes(secret)
        self._tls = tls
        self.timeout = timeout
        # A fill or warm includes the owner's own object-store fetch and its
        # queue under load: a deadline as short as a plain get's would turn a
        # busy, healthy owner into a "failed" one.
        self.fill_timeout = max(timeout, fill_timeout)
        self.backoff = backoff
        self.max_idle_per_peer = max_idle_per_peer
        self._idle: dict[str, deque[_Conn]] = {}
        self._limits: dict[str, trio.Semaphore] = {}
        self._down_until: dict[str, float] = {}
        self._scratch: list[bytearray] = []
        self._closed = False

    # -- public API

    async def get(self, addr: str, key: str, off: int = 0, length: int = -1, *,
                  fill: bool = True) -> bytes | None:
        """Bytes [off, off+length) of block ``key`` (length -1: to its end;
        a range past the end is cut short). fill=True: the owner fetches from
        the object store on a miss. fill=False: only what the peer already
        has, None if it has not."""
        if off < 0 or length < -1:
            raise ValueError(f"bad range ({off}, {length})")
        status, _a, _b, body = await self._request(
            addr, OP_GET, _encode_key(key), FLAG_FILL if fill else 0, off, length)
        if status == ST_MISS:
            return None
        return body

    async def warm(self, addr: str, key: str) -> tuple[int, bool]:
        """Make the owner hold block ``key`` (fetching it if needed) without
        sending it here. Returns (block size, was already cached)."""
        _status, size, cached, _body = await self._request(addr, OP_WARM, _encode_key(key), 0, 0, 0)
        return size, bool(cached)

    async def check(self, addr: str, keys: list[str]) -> list[bool]:
        """Which of ``keys`` the peer holds (in its own tiers)."""
        out: list[bool] = []
        for batch in _batches([_encode_key(k) for k in keys]):
            _s, _a, _b, body = await self._request(
                addr, OP_CHECK, b"", 0, len(batch), 0, b"\n".join(batch))
            out.extend(bool(x) for x in body)
        return out

    async def evict(self, addr: str, keys: list[str]) -> int:
        """Drop ``keys`` from the peer's tiers; returns how many it held."""
        n = 0
        for batch in _batches([_encode_key(k) for k in keys]):
            _s, evicted, _b, _body = await self._request(
                addr, OP_EVICT, b"", 0, len(batch), 0, b"\n".join(batch))
            n += evicted
        return n

    def available(self, addr: str) -> bool:
        """False while ``addr`` is in back-off after a failure."""
        until = self._down_until.get(addr)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._down_until[addr]
            return True
        return False

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._scratch.clear()
        await trio.lowlevel.checkpoint()

    # -- internals

    def _mark_down(self, addr: str) -> None:
        self._down_until[addr] = time.monotonic() + self.backoff
        for conn in self._idle.pop(addr, ()):
            conn.close()

    async def _request(self, addr: str, op: int, key: bytes, flags: int, a: int, b: int,
                       payload: bytes = b""):
        if self._closed:
            raise PeerError("peer client is closed", addr=addr)
        if not self.available(addr):
            raise PeerError(f"{addr}: skipped, in back-off after a failure", addr=addr)
        timeout = self.fill_timeout if op == OP_WARM or (op == OP_GET and flags & FLAG_FILL) else self.timeout
        try:
            status, ra, rb, body = await self._exchange_pooled(addr, op, key, flags, a, b, payload, timeout)
        except trio.TooSlowError:
            self._mark_down(addr)
            raise PeerError(f"{_what(addr, op, key)}: no answer within {timeout} s",
                            addr=addr) from None
        except (_Failure, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._mark_down(addr)
            raise PeerError(f"{_what(addr, op, key)}: {e or type(e).__name__}", addr=addr) from e
        if status in (ST_ERROR, ST_BAD_REQUEST):
            message = body.decode(errors="replace")
            raise PeerError(f"{_what(addr, op, key)}: peer answered: {message}",
                            addr=addr, remote=True)
        return status, ra, rb, body

    async def _exchange_pooled(self, addr, op, key, flags, a, b, payload, timeout: float):
        limit = self._limits.get(addr)
        if limit is None:
            limit = self._limits[addr] = trio.Semaphore(self.max_connections_per_peer)
        try:
            limit.acquire_nowait()      # the common case, without a scheduling round
        except trio.WouldBlock:
            # Waiting for a connection slot is our own queue, not the peer's
            # slowness: the deadline starts once the request can go out.
            await limit.acquire()
        try:
            with trio.fail_after(timeout):
                return await self._exchange_retrying(addr, op, key, flags, a, b, payload)
        finally:
            limit.release()

    async def _exchange_retrying(self, addr, op, key, flags, a, b, payload):
        for attempt in (0, 1):
            conn, fresh = await self._acquire(addr)
            ok = False
            try:
                conn.received = 0
                result = await _exchange(conn, op, key, flags, a, b, payload, self._scratch)
                ok = True
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                # A pooled connection the peer closed while it sat idle
                # (restart, idle timeout): retry once on a new one. All ops
                # are idempotent, and nothing of a response came.
                if fresh or conn.received or attempt:
                    raise
                log.debug("peer %s: pooled connection was closed, reconnecting", addr)
                continue
            finally:
                if ok:
                    self._release(addr, conn)
                else:
                    conn.close()   # broken, timed out or cancelled: never reused
            return result
        raise AssertionError("unreachable")

    async def _acquire(self, addr: str) -> tuple[_Conn, bool]:
        idle = self._idle.get(addr)
        if idle:
            now = time.monotonic()
            while idle and now - idle[0].idle_since > CLIENT_IDLE_MAX:
                idle.popleft().close()
            if idle:
                return idle.pop(), False
        try:
            host, port = _split_addr(addr)
        except ValueError as e:    # addresses come from the membership table
            raise _ProtocolError(str(e)) from None
        # Connecting and authenticating take the short deadline even for a
        # fill: a peer that does not even greet us is not busy fetching.
        with trio.fail_after(self.timeout):
            stream = await trio.open_tcp_stream(host, port)
            conn = _Conn(stream)
            try:
                _set_nodelay(stream)
                if self._tls is not None:
                    tls = trio.SSLStream(stream, self._tls)
                    await tls.do_handshake()
                    conn = _Conn(tls, stream)
                await _client_handshake(conn, self._secret)
            except BaseException:
                conn.close()
                raise
        return conn, True

    def _release(self, addr: str, conn: _Conn) -> None:
        idle = self._idle.setdefault(addr, deque())
        if self._closed or len(idle) >= self.max_idle_per_peer or addr in self._down_until:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)


async def _exchange(conn: _Conn, op: int, key: bytes, flags: int, a: int, b: int, payload: bytes,
                    scratch: list[bytearray] | None = None):
    """One request and its response on an authenticated connection."""
    await conn.send(_HEADER.pack(MAGIC, VERSION, op, 0, flags, len(key), len(payload), a, b,
                                 _request_checksum(key, payload)), key, payload)
    magic, version, rop, status, _flags, key_len, plen, ra, rb, checksum = await conn.read_header()
    if magic != MAGIC or version != VERSION:
        raise _ProtocolError(f"bad magic/version in response {magic!r}/{version}")
    if rop != op or key_len != 0:
        raise _ProtocolError(f"response does not match the request (op {rop}, key length {key_len})")
    if status not in (ST_OK, ST_MISS, ST_ERROR, ST_BAD_REQUEST):
        raise _ProtocolError(f"unknown status {status}")
    limit = MAX_ERROR_MESSAGE if status in (ST_ERROR, ST_BAD_REQUEST) else MAX_PAYLOAD
    if status == ST_OK:
        if op == OP_GET and b >= 0:
            limit = min(limit, b)
        elif op == OP_CHECK:
            limit = a
        elif op in (OP_WARM, OP_EVICT):
            limit = 0
    elif status == ST_MISS:
        if op != OP_GET or flags & FLAG_FILL:
            raise _ProtocolError("unexpected miss")
        limit = 0
    if plen > limit:
        raise _ProtocolError(f"response payload of {plen} bytes, expected at most {limit}")
    body = await conn.read_payload(plen, scratch)
    if _payload_checksum(body) != checksum:
        raise _ChecksumError("checksum mismatch in response")
    if status == ST_OK and op == OP_GET and rb != _key_hash(key):
        raise _ProtocolError("the peer served another key than the one asked for")
    if status == ST_OK and op == OP_CHECK and plen != a:
        raise _ProtocolError(f"check answered {plen} of {a} keys")
    return status, ra, rb, body


def _what(addr: str, op: int, key: bytes) -> str:
    what = f"{addr}: {_OP_NAMES[op]}"
    if key:
        what += f" {key[:80].decode(errors='replace')!r}"
    return what


def _batches(keys: list[bytes]):
    batch: list[bytes] = []
    size = 0
    for k in keys:
        if batch and size + len(k) + 1 > LIST_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(k)
        size += len(k) + 1
    if batch:
        yield batch
