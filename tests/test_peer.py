"""The peer protocol of a cache group (jfscache.group.peer), on loopback.

No Redis, S3 or FUSE: the server serves from an in-memory BlockSource, and
misbehaving peers are raw sockets, a stalling listener and a byte-flipping
proxy. Each test runs its own trio.run under a deadline.
"""
from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from jfscache.group import peer
from jfscache.group.peer import PeerClient, PeerError, open_peer_server

SECRET = b"group-secret-of-the-volume"
HOST = "127.0.0.1"
MiB = 1 << 20


def run(fn, limit: float = 10.0):
    async def main():
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


def block(i: int, size: int = 64 * 1024) -> bytes:
    return (f"block-{i}-".encode() * (size // 8 + 1))[:size]


class FakeSource:
    """An in-memory BlockSource: ``store`` plays the object store, ``cache``
    this node's own tiers; ``fetches`` counts reads from the store."""

    def __init__(self, store=None, cached=()):
        self.store: dict[str, bytes] = dict(store or {})
        self.cache: dict[str, bytes] = {k: self.store[k] for k in cached}
        self.fetches = 0
        self.calls = 0
        self.fail: dict[str, Exception] = {}
        self.stall = False

    async def local(self, key):
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return self.cache.get(key)

    async def fill(self, key):
        self.calls += 1
        if self.stall:
            await trio.sleep_forever()
        if key in self.cache:
            await trio.lowlevel.checkpoint()
            return self.cache[key]
        if key in self.fail:
            raise self.fail[key]
        await trio.sleep(0)
        self.fetches += 1
        data = self.store[key]
        self.cache[key] = data
        return data

    def contains(self, key):
        self.calls += 1
        return key in self.cache

    def evict(self, key):
        self.cache.pop(key, None)


class Served:
    """A stats sink with add(name, n), as the peer server expects."""

    def __init__(self):
        self.c = {}

    def add(self, name, n=1):
        self.c[name] = self.c.get(name, 0) + n


def dead_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def raw_authenticated(port: int, secret: bytes = SECRET) -> peer._Conn:
    stream = await trio.open_tcp_stream(HOST, port)
    conn = peer._Conn(stream)
    await peer._client_handshake(conn, secret)
    return conn


async def read_until_eof(stream, limit: int = 1 << 20) -> bytes:
    out = b""
    while len(out) < limit:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        out += data
    return out


# ---------------------------------------------------------------------------

def test_get_hit_miss_and_fill():
    async def main():
        store = {f"k{i}": block(i) for i in range(4)}
        src = FakeSource(store, cached=["k0"])
        stats = Served()
        async with open_peer_server(HOST, 0, SECRET, src, stats=stats) as server:
            assert server.port > 0 and server.address == f"{HOST}:{server.port}"
            client = PeerClient(SECRET)
            try:
                addr = server.address
                assert await client.get(addr, "k0") == store["k0"]          # hit
                assert src.fetches == 0
                assert await client.get(addr, "k1", fill=False) is None     # miss, no fill
                assert src.fetches == 0
                got = await client.get(addr, "k1")                         # miss, owner fills
                assert got == store["k1"] and isinstance(got, bytes)
                assert src.fetches == 1
                assert await client.get(addr, "k1") == store["k1"]          # now cached
                assert await client.get(addr, "k1", fill=False) == store["k1"]
                assert src.fetches == 1
                assert client.available(addr)
            finally:
                await client.aclose()
            s = server.served
            assert s.requests == 5 and s.errors == 0 and s.auth_failures == 0
            assert s.bytes == 4 * len(store["k0"])
            assert s.connections == 1          # sequential requests reuse one connection
            assert stats.c["peer_served_requests"] == 5
            assert stats.c["peer_served_bytes"] == s.bytes
    run(main)


def test_ranges():
    async def main():
        data = os.urandom(4 * MiB)
        src = FakeSource({"b": data}, cached=["b"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            addr = server.address
            try:
                assert await client.get(addr, "b", 0, 100) == data[:100]
                assert await client.get(addr, "b", 1000, 65536 * 3 + 7) == data[1000:1000 + 65536 * 3 + 7]
                assert await client.get(addr, "b", 3 * MiB) == data[3 * MiB:]
                assert await client.get(addr, "b", 4 * MiB - 10, 100) == data[-10:]  # cut short
                assert await client.get(addr, "b", 4 * MiB) == b""
                assert await client.get(addr, "b", 5, 0) == b""
                with pytest.raises(PeerError, match="outside") as ei:
                    await client.get(addr, "b", 4 * MiB + 1)
                assert ei.value.remote
                assert client.available(addr)     # the peer answered: no back-off
                with pytest.raises(ValueError):
                    await client.get(addr, "b", -1)
                whole = await client.get(addr, "b")
                assert whole == data and isinstance(whole, bytes)
                assert await client.get(addr, "b", 1) == data[1:]   # the receive buffer is reused
                assert whole == data
            finally:
                await client.aclose()
            assert server.served.connections == 1
    run(main)


def test_concurrent_gets_use_several_connections():
    async def main():
        n = 48
        store = {f"k{i}": block(i, 256 * 1024 if i % 8 else 4 * MiB) for i in range(n)}
        src = FakeSource(store)
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET, max_idle_per_peer=8)
            addr = server.address
            results = {}

            async def fetch(client, keys):
                for k in keys:
                    results[k] = await client.get(addr, k)

            async def fetch_all(client, tasks=8):
                results.clear()
                async with trio.open_nursery() as nursery:
                    for t in range(tasks):
                        nursery.start_soon(fetch, client, [f"k{i}" for i in range(t, n, tasks)])
                assert results == store

            try:
                await fetch_all(client)
                assert src.fetches == n
                assert 1 < server.served.connections <= 8
                assert len(client._idle[addr]) <= 8
                # a second pass reuses the pooled connections
                before = server.served.connections
                await fetch_all(client)
                assert server.served.connections == before
                assert src.fetches == n
            finally:
                await client.aclose()

            # fewer idle slots than concurrent tasks: the surplus is closed
            small = PeerClient(SECRET, max_idle_per_peer=2)
            await fetch_all(small)
            assert len(small._idle[addr]) == 2
            await small.aclose()

            # the per-peer connection limit bounds concurrency
            capped = PeerClient(SECRET, max_idle_per_peer=8)
            capped.max_connections_per_peer = 3
            before = server.served.connections
            await fetch_all(capped)
            assert server.served.connections - before <= 3
            await capped.aclose()
    run(main)


def test_wrong_secret_is_refused():
    async def main():
        src = FakeSource({"k": b"x" * 100}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            bad = PeerClient(b"not-the-secret")
            with pytest.raises(PeerError, match="refused"):
                await bad.get(server.address, "k")
            assert not bad.available(server.address)
            await bad.aclose()
            assert server.served.auth_failures == 1
            assert server.served.requests == 0 and server.served.connections == 0
            assert src.calls == 0
            # the right secret still works
            good = PeerClient(SECRET)
            assert await good.get(server.address, "k") == b"x" * 100
            await good.aclose()
    run(main)


def test_mutual_tls_between_members(tmp_path):
    """--group-tls-*: blocks travel over TLS; a client without TLS, or with a
    certificate the group's CA did not sign, gets nothing."""
    from helpers import make_certs
    c = make_certs(tmp_path)
    server_ctx, client_ctx = peer.tls_contexts(c / "server.pem", c / "server.key", c / "ca.pem")
    _, rogue_ctx = peer.tls_contexts(c / "other.pem", c / "other.key", c / "ca.pem")
    data = block(1, 3 * MiB)   # large payloads take the stream path under TLS

    async def main():
        src = FakeSource({"k": data, "s": b"small"}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src, tls=server_ctx) as server:
            good = PeerClient(SECRET, tls=client_ctx)
            assert await good.get(server.address, "k") == data
            assert await good.get(server.address, "s") == b"small"
            assert await good.get(server.address, "k", 5, 10) == data[5:15]
            await good.aclose()
            for bad in (PeerClient(SECRET, timeout=1), PeerClient(SECRET, timeout=1, tls=rogue_ctx)):
                with pytest.raises(PeerError):
                    await bad.get(server.address, "k")
                await bad.aclose()
            assert server.served.requests == 3 and server.served.auth_failures >= 1
        with pytest.raises(ValueError, match="cannot use the cache group's TLS files"):
            peer.tls_contexts(c / "missing.pem", c / "server.key", c / "ca.pem")
    run(main)


def test_client_rejects_server_without_the_secret():
    async def main():
        src = FakeSource({"k": b"x"}, cached=["k"])
        # The server holds a different secret: it refuses us first. Check the
        # client's own verification too by faking a server that accepts
        # anything and sends a wrong proof.
        async def impostor(stream):
            await stream.send_all(peer._HELLO + os.urandom(peer.NONCE_LEN))
            await read_exactly(stream, peer.NONCE_LEN + peer.MAC_LEN)
            await stream.send_all(peer._AUTH_OK + os.urandom(peer.MAC_LEN))
            await trio.sleep(5)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, impostor, 0)
            port = listeners[0].socket.getsockname()[1]
            client = PeerClient(SECRET)
            with pytest.raises(PeerError, match="prove"):
                await client.get(f"{HOST}:{port}", "k")
            await client.aclose()
            nursery.cancel_scope.cancel()
        assert src.calls == 0
    run(main)


async def read_exactly(stream, n):
    buf = b""
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError
        buf += data
    return buf


def test_garbage_and_oversized_headers_are_dropped():
    async def main():
        src = FakeSource({"k": b"payload"}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            port = server.port
            # 1. unauthenticated garbage: closed at the challenge
            s = await trio.open_tcp_stream(HOST, port)
            await s.send_all(os.urandom(200))
            rest = await read_until_eof(s)
            assert len(rest) <= len(peer._HELLO) + peer.NONCE_LEN + 1
            await s.aclose()
            assert server.served.auth_failures == 1

            H = peer._HEADER
            bad_headers = [
                # key length past the bound
                H.pack(peer.MAGIC, peer.VERSION, peer.OP_GET, 0, 0, 60000, 0, 0, -1, 0),
                # payload length past the bound (4 GiB - 1)
                H.pack(peer.MAGIC, peer.VERSION, peer.OP_CHECK, 0, 0, 0, 2**32 - 1, 1, 0, 0),
                # not our magic
                b"GET / HTTP/1.1\r\n\r\n".ljust(H.size, b"x"),
                # right framing, wrong checksum
                H.pack(peer.MAGIC, peer.VERSION, peer.OP_GET, 0, 0, 1, 0, 0, -1, 12345) + b"k",
            ]
            for i, raw in enumerate(bad_headers):
                conn = await raw_authenticated(port)
                await conn.stream.send_all(raw)
                with trio.fail_after(2):
                    assert await read_until_eof(conn.stream) == b""     # closed, nothing served
                conn.close()
                assert server.served.errors == i + 1
            assert server.served.requests == 0 and src.calls == 0

            # an authenticated client that sends half a header and leaves
            conn = await raw_authenticated(port)
            await conn.stream.send_all(b"JP\x01")
            conn.close()

            # the server still serves others
            client = PeerClient(SECRET)
            assert await client.get(server.address, "k") == b"payload"
            assert await client.check(server.address, ["k"]) == [True]
            await client.aclose()
    run(main)


def test_unknown_op_is_answered_and_connection_kept():
    async def main():
        src = FakeSource({"k": b"payload"}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            conn = await raw_authenticated(server.port)
            with pytest.raises(PeerError, match="unknown op") as ei:
                status, _a, _b, body = await peer._exchange(conn, 99, b"k", 0, 0, 0, b"")
                if status != peer.ST_OK:
                    raise PeerError(bytes(body).decode(), remote=True)
            assert ei.value.remote
            status, size, _b, body = await peer._exchange(conn, peer.OP_GET, b"k", 0, 0, -1, b"")
            assert status == peer.ST_OK and bytes(body) == b"payload" and size == 7
            conn.close()
    run(main)


async def corrupting_proxy(target_port: int, flip_at: int, direction: str, task_status):
    """Forwards one connection to target_port, flipping the byte at offset
    ``flip_at`` of the stream in ``direction`` ("down": server to client,
    "up": client to server)."""

    async def pump(src, dst, flip):
        pos = 0
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if flip is not None and pos <= flip < pos + len(data):
                    b = bytearray(data)
                    b[flip - pos] ^= 0x40
                    data = bytes(b)
                pos += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(dst)

    async def handler(client_stream):
        server_stream = await trio.open_tcp_stream(HOST, target_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, server_stream, client_stream, flip_at if direction == "down" else None)
            nursery.start_soon(pump, client_stream, server_stream, flip_at if direction == "up" else None)

    await trio.serve_tcp(handler, 0, host=HOST, task_status=task_status)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_corruption_on_the_wire_is_never_returned(direction):
    async def main():
        data = os.urandom(1 * MiB)
        src = FakeSource({"blk": data}, cached=["blk"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            hs_down = len(peer._HELLO) + peer.NONCE_LEN + 1 + peer.MAC_LEN
            hs_up = peer.NONCE_LEN + peer.MAC_LEN
            if direction == "down":     # a byte in the middle of the block
                flip = hs_down + peer._HEADER.size + 500_000
            else:                       # a byte of the key in the request
                flip = hs_up + peer._HEADER.size + 1
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(corrupting_proxy, server.port, flip, direction)
                addr = f"{HOST}:{listeners[0].socket.getsockname()[1]}"
                client = PeerClient(SECRET)
                if direction == "down":
                    with pytest.raises(PeerError, match="checksum"):
                        await client.get(addr, "blk")
                else:       # the server drops the corrupt request; we see the close
                    with pytest.raises(PeerError):
                        await client.get(addr, "blk")
                assert not client.available(addr)
                await client.aclose()
                nursery.cancel_scope.cancel()
            if direction == "up":
                assert server.served.requests == 0 and server.served.errors == 1
    run(main)


def test_corrupt_response_checksum_detected_in_process(monkeypatch):
    """Same guarantee, without a proxy: the server's checksum is wrong."""
    async def main():
        src = FakeSource({"k": b"abc" * 1000}, cached=["k"])
        real_send = peer._Conn.send

        async def corrupting_send(self, header, key=b"", payload=b""):
            if not key and len(payload):       # the server's response (the test only gets)
                payload = bytearray(payload)
                payload[len(payload) // 2] ^= 1
            await real_send(self, header, key, payload)

        monkeypatch.setattr(peer._Conn, "send", corrupting_send)
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            with pytest.raises(PeerError, match="checksum"):
                await client.get(server.address, "k")
            await client.aclose()
    run(main)


def test_stalled_peer_times_out_then_backs_off():
    async def main():
        accepted = []

        async def mute(stream):            # accepts and never says a word
            accepted.append(stream)
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, mute, 0)
            addr = f"{HOST}:{listeners[0].socket.getsockname()[1]}"
            client = PeerClient(SECRET, timeout=0.5, fill_timeout=0.5, backoff=0.6)
            t0 = trio.current_time()
            with pytest.raises(PeerError, match="no answer within"):
                await client.get(addr, "k")
            elapsed = trio.current_time() - t0
            assert 0.45 <= elapsed < 2.0
            assert not client.available(addr)
            t0 = trio.current_time()
            with pytest.raises(PeerError, match="back-off"):
                await client.get(addr, "k")
            with pytest.raises(PeerError, match="back-off"):
                await client.check(addr, ["k"])
            assert trio.current_time() - t0 < 0.1
            assert len(accepted) == 1                  # back-off did not connect
            await trio.sleep(0.7)
            assert client.available(addr)              # back-off expires
            with pytest.raises(PeerError):
                await client.get(addr, "k")
            assert len(accepted) == 2
            await client.aclose()
            nursery.cancel_scope.cancel()
    run(main)


def test_stall_after_auth_and_recovery():
    async def main():
        src = FakeSource({"k": b"v" * 10}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET, timeout=0.3, fill_timeout=0.3, backoff=0.2)
            src.stall = True
            with pytest.raises(PeerError, match="no answer"):
                await client.get(server.address, "k")
            assert not client.available(server.address)
            src.stall = False
            await trio.sleep(0.25)
            assert await client.get(server.address, "k") == b"v" * 10   # a new connection
            assert server.served.connections == 2
            await client.aclose()
    run(main)


def test_dead_address():
    async def main():
        client = PeerClient(SECRET, timeout=2.0, fill_timeout=2.0)
        addr = f"{HOST}:{dead_port()}"
        with pytest.raises(PeerError) as ei:
            await client.get(addr, "k")
        assert not ei.value.remote and ei.value.addr == addr
        assert not client.available(addr)
        assert client.available(f"{HOST}:1")    # other peers are unaffected
        with pytest.raises(PeerError, match="host:port"):
            await client.get("no-port-here", "k")
        await client.aclose()
    run(main)


def test_warm_check_evict():
    async def main():
        store = {f"k{i}": block(i, 1000 + i) for i in range(3)}
        src = FakeSource(store, cached=["k0"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            addr = server.address
            assert await client.warm(addr, "k1") == (1001, False)
            assert src.fetches == 1
            assert await client.warm(addr, "k1") == (1001, True)
            assert await client.warm(addr, "k0") == (1000, True)
            assert src.fetches == 1
            assert server.served.bytes == 0                  # warm sends no payload
            assert await client.check(addr, ["k0", "k1", "k2", "nope"]) == [True, True, False, False]
            assert await client.check(addr, []) == []
            assert await client.evict(addr, ["k0", "nope"]) == 1
            assert await client.check(addr, ["k0", "k1"]) == [False, True]
            assert await client.evict(addr, []) == 0

            # long lists go in several requests
            many = [f"chunks/{i // 1000}/{i}_0_4194304" for i in range(30000)]
            for k in many[::3]:
                src.cache[k] = b"x"
            before = server.served.requests
            assert await client.check(addr, many) == [i % 3 == 0 for i in range(30000)]
            assert server.served.requests - before > 1
            assert await client.evict(addr, many) == 10000
            assert not any(await client.check(addr, many[:10]))

            with pytest.raises(ValueError):
                await client.check(addr, ["a\nb"])
            with pytest.raises(ValueError):
                await client.get(addr, "x" * (peer.MAX_KEY + 1))
            with pytest.raises(ValueError):
                await client.get(addr, "")
            await client.aclose()
    run(main)


def test_source_errors_become_peer_errors():
    async def main():
        src = FakeSource({"ok": b"fine"})
        src.fail["bad"] = OSError("S3 said 503 SlowDown")
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            addr = server.address
            with pytest.raises(PeerError, match="503 SlowDown") as ei:
                await client.get(addr, "bad")
            assert ei.value.remote
            with pytest.raises(PeerError, match="KeyError"):
                await client.get(addr, "missing-from-store")
            with pytest.raises(PeerError, match="503"):
                await client.warm(addr, "bad")
            assert client.available(addr)
            assert await client.get(addr, "ok") == b"fine"
            assert server.served.errors == 3
            assert server.served.connections == 1          # the connection stayed usable

            # a source that returns nonsense or raises from a sync method
            src.cache["weird"] = 12345
            with pytest.raises(PeerError, match="TypeError"):
                await client.get(addr, "weird")

            def broken_contains(key):
                raise RuntimeError("index corrupt")
            src.contains = broken_contains
            with pytest.raises(PeerError, match="index corrupt"):
                await client.check(addr, ["ok"])
            assert await client.get(addr, "ok") == b"fine"
            await client.aclose()
    run(main)


def test_pooled_connection_closed_by_restarted_peer_is_retried():
    async def main():
        src = FakeSource({"k": b"v1"}, cached=["k"])
        client = PeerClient(SECRET)
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            port = server.port
            assert await client.get(server.address, "k") == b"v1"
        assert len(client._idle[f"{HOST}:{port}"]) == 1    # now closed by the server
        await trio.sleep(0.05)
        async with open_peer_server(HOST, port, SECRET, src) as server2:
            assert await client.get(server2.address, "k") == b"v1"
            assert client.available(server2.address)
            assert server2.served.connections == 1
        await client.aclose()
    run(main)


def test_cancelled_request_does_not_return_connection_to_pool():
    async def main():
        src = FakeSource({"k": b"v"}, cached=["k"])
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            src.stall = True
            with trio.move_on_after(0.2):
                await client.get(server.address, "k")
            assert not client._idle.get(server.address)
            assert client.available(server.address)   # our cancellation is not the peer's fault
            src.stall = False
            assert await client.get(server.address, "k") == b"v"
            assert server.served.connections == 2
            await client.aclose()
            with pytest.raises(PeerError, match="closed"):
                await client.get(server.address, "k")
    run(main)


def test_secrets_must_be_given():
    with pytest.raises(ValueError):
        PeerClient(b"")
    with pytest.raises(ValueError):
        peer._split_addr("no-port")
    assert peer._split_addr("[::1]:9750") == ("::1", 9750)
    assert struct.calcsize(peer._HEADER.format) == peer._HEADER.size == 36


def test_response_for_another_key_is_rejected(monkeypatch):
    async def main():
        src = FakeSource({"a": b"A" * 100, "b": b"B" * 100}, cached=["a", "b"])
        real = peer.PeerServer._dispatch

        async def confused(self, op, flags, key, payload, a, b):
            # a server bug: serves block "b" whatever was asked
            return await real(self, op, flags, b"b" if op == peer.OP_GET else key, payload, a, b)

        monkeypatch.setattr(peer.PeerServer, "_dispatch", confused)
        async with open_peer_server(HOST, 0, SECRET, src) as server:
            client = PeerClient(SECRET)
            assert await client.get(server.address, "b") == b"B" * 100
            with pytest.raises(PeerError, match="another key"):
                await client.get(server.address, "a")
            await client.aclose()
    run(main)
