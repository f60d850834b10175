"""This node's part in a cache group: membership, placement, and where a
block that the local tiers miss comes from.

A miss goes to the block's owner (weighted rendezvous over the live members,
ring.py), which fetches it from the object store once for the whole group and
keeps it in its own tiers; the requester keeps it in memory only, so the
group's disk space holds one copy of each block. A block this node owns comes
from the owner before the last membership change if that differs (a scale-up
does not refetch from S3 what the group already holds), else from the store.
Any peer failure falls back to the store: a read never fails because of a
peer, and bytes from a peer are checksummed (peer.py).

The block cache reaches all this through one callable, `fetch(key) ->
(bytes, keep on disk)`, and the peer server reaches the block cache through
the small BlockSource interface: cache/ never imports group/.
"""
from __future__ import annotations

import logging
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import trio

from ..metrics import Metrics
from .membership import Member, Membership
from .peer import PeerClient, PeerError, open_peer_server, tls_contexts
from .ring import Ring

log = logging.getLogger(__name__)


SETTLE = 60.0  # seconds after which a joined member counts as holding its share of blocks


class GroupError(Exception):
    """A cache group cannot be joined (one line, for the CLI)."""


@dataclass
class GroupOptions:
    name: str
    listen: str = ""  # "host:port" to serve peers on; "" with sharing=False
    weight: float = 1.0
    sharing: bool = True
    heartbeat: float = 1.0  # seconds between heartbeats (and ring refreshes)
    timeout: float = 5.0  # a member silent this long leaves the ring
    peer_timeout: float = 5.0  # deadline of one peer request
    backoff: float = 10.0  # a failed peer is skipped this long
    tls: tuple[str, str, str] | None = None  # (cert, key, CA) files: peers talk mutual TLS


class _Source:
    """What peers are served from: this node's tiers, and for a fill the
    fetch of an owner (never forwarded to another peer, so two nodes whose
    rings briefly disagree cannot bounce a request between them)."""

    def __init__(self, node: "GroupNode"):
        self.node = node

    async def local(self, key: str) -> bytes | None:
        return await self.node.cache.local(key)

    async def fill(self, key: str) -> bytes:
        return await self.node.cache.get(key, fetch=self.node.fetch_as_owner)

    async def warm(self, key: str) -> bytes:
        return await self.node.cache.warm(key, fetch=self.node.fetch_as_owner)

    def contains(self, key: str) -> bool:
        return self.node.cache.contains(key)

    def evict(self, key: str) -> None:
        self.node.cache.evict(key)


class GroupNode:
    def __init__(self, redis, secret: str, opts: GroupOptions, cache,
                 from_store: Callable[[str], Awaitable[bytes]], metrics: Metrics | None = None):
        self.opts = opts
        self.metrics = metrics if metrics is not None else Metrics()
        self.cache = cache
        self.from_store = from_store
        self.tls_server, tls_client = tls_contexts(*opts.tls) if opts.tls else (None, None)
        self.client = PeerClient(secret.encode(), timeout=opts.peer_timeout, backoff=opts.backoff, tls=tls_client)
        self._redis = redis
        self._secret = secret.encode()
        self.membership: Membership | None = None
        self.ring = Ring({})
        self.prev_ring: Ring | None = None
        self.settled = Ring({})
        self.members: list[Member] = []
        self.id = ""
        self._warned: dict[str, float] = {}

    # ---- placement --------------------------------------------------------
    def owner(self, key: str) -> str | None:
        return self.ring.owner(key)

    async def fetch(self, key: str) -> tuple[bytes, bool]:
        """A block the local tiers missed: (bytes, whether to keep it on disk)."""
        owner = self.ring.owner(key)
        if owner is None or owner == self.id:
            return await self.fetch_as_owner(key), True
        if self.client.available(owner):
            self.metrics.group_request(owner)
            try:
                data = await self.client.get(owner, key, fill=True)
                self.metrics.hit("group", len(data))
                return data, False
            except PeerError as e:
                self._peer_failed(owner, e)
        self.metrics.miss("group")  # the read falls back to the store
        return await self.from_store(key), False

    async def fetch_as_owner(self, key: str) -> bytes:
        """A peer asked this node to fill a block, or this node owns it.
        Before the object store, ask (without fill, so a request never
        bounces between members): the owner by this node's current ring, if
        that is another member (rings briefly differ while membership
        changes); the owner among the members that joined over SETTLE
        seconds ago, and the owner before the last ring change (after a
        join, the group already holds what the new owner misses)."""
        candidates = [self.ring.owner(key), self.settled.owner(key)]
        if self.prev_ring is not None:
            candidates.append(self.prev_ring.owner(key))
        asked = {None, self.id}
        live = {m.id for m in self.members}
        for peer in candidates:
            # A member that left is not asked: it is gone, or it restarted
            # with an empty cache.
            if peer in asked or peer not in live or not self.client.available(peer):
                continue
            asked.add(peer)
            self.metrics.group_request(peer)
            try:
                data = await self.client.get(peer, key, fill=False)
            except PeerError as e:
                self._peer_failed(peer, e)
                continue
            if data is not None:
                self.metrics.group_handover_hits += 1
                return data
        return await self.from_store(key)

    def _peer_failed(self, addr: str, e: PeerError) -> None:
        self.metrics.group_error(addr)
        if e.remote:  # the peer is up; its own object-store fetch failed
            return
        # One line per peer per back-off period, not one per block.
        now = time.monotonic()
        if self._warned.get(addr, 0) < now:
            self._warned[addr] = now + self.opts.backoff
            log.warning("cache group peer %s failed (%s); skipped for %g s", addr, e, self.opts.backoff)

    # ---- warmup (vfs/fill.py's Warmer) -------------------------------------
    async def warm(self, key: str) -> bool:
        """Make the block's owner hold it; True if it did already."""
        owner = self.ring.owner(key)
        if owner is None or owner == self.id:
            cached = self.cache.contains(key)
            await self.cache.warm(key, fetch=self.fetch_as_owner)
            return cached
        self.metrics.group_request(owner)
        try:
            return (await self.client.warm(owner, key))[1]
        except PeerError as e:
            self._peer_failed(owner, e)
            raise

    def _by_owner(self, keys: list[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(self.ring.owner(k) or self.id, []).append(i)
        return out

    async def check(self, keys: list[str]) -> list[tuple[str, bool | None]]:
        """(owner, whether the owner holds it) per key; None where the owner
        could not be asked (unknown, not "not cached")."""
        out: list[tuple[str, bool | None]] = [("", False)] * len(keys)
        for owner, idx in self._by_owner(keys).items():
            if owner == self.id:
                found = [self.cache.contains(keys[i]) for i in idx]
            else:
                self.metrics.group_request(owner)
                try:
                    found = await self.client.check(owner, [keys[i] for i in idx])
                except PeerError as e:
                    self._peer_failed(owner, e)
                    found = [None] * len(idx)
            for i, f in zip(idx, found):
                out[i] = (owner, f)
        return out

    async def evict(self, keys: list[str]) -> int:
        """Drop the blocks at their owners, and this node's own copies."""
        n = 0
        for owner, idx in self._by_owner(keys).items():
            if owner != self.id:
                self.metrics.group_request(owner)
                try:
                    n += await self.client.evict(owner, [keys[i] for i in idx])
                except PeerError as e:
                    self._peer_failed(owner, e)
        for k in keys:
            n += self.cache.contains(k) and self.ring.owner(k) in (None, self.id)
            self.cache.evict(k)
        return n

    # ---- membership -------------------------------------------------------
    async def set_weight(self, request: dict) -> dict:
        """A .control request {"op": "group-weight", "weight": W}: this
        member's share of the keys from now on (0 drains it). The others see
        it at their next heartbeat; the blocks it owned move to their new
        owners as after any ring change (they ask this member first, then S3)."""
        weight = float(request["weight"])
        if not (weight >= 0 and weight != float("inf")):
            raise ValueError(f"weight must be a finite number >= 0, not {request['weight']!r}")
        if not self.opts.sharing:
            return {"error": "this node is a client of the group (--no-sharing): it owns nothing to drain"}
        before, self.membership.weight = self.membership.weight, weight
        self._update(await self.membership.beat(self._info()))
        log.info("cache group %s: weight of this member %g -> %g", self.opts.name, before, weight)
        return {"weight": weight, "was": before, "member": self.id}

    def _update(self, members: list[Member]) -> None:
        self.members = members
        ring = Ring({m.id: m.weight for m in members if m.sharing})
        # The ring of members that joined over SETTLE seconds ago: when many
        # join at once (a scale-up), their blocks are with those members, and
        # one ring change later (prev_ring) would already name a joiner.
        cutoff = time.time() - SETTLE
        self.settled = Ring({m.id: m.weight for m in members if m.sharing and m.info.get("joined", 0) <= cutoff})
        self.metrics.group_members = len(ring)
        if ring != self.ring:
            joined = set(ring.members) - set(self.ring.members)
            left = set(self.ring.members) - set(ring.members)
            if joined or left or self.ring.members:
                log.info("cache group %s: %d members (joined %s, left %s)", self.opts.name, len(ring),
                         sorted(joined) or "-", sorted(left) or "-")
            self.prev_ring, self.ring = self.ring if len(self.ring) else None, ring

    def _info(self) -> dict:
        m = self.metrics
        return {"cache_bytes": self.cache.cached_bytes(), "hits": m.hits["mem"] + m.hits["disk"],
                "misses": m.local_misses, "served": m.served_requests,
                "served_bytes": m.served_bytes, "sharing": self.opts.sharing}

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.opts.heartbeat)
            try:
                self._update(await self.membership.beat(self._info()))
            except OSError:
                pass  # Redis unreachable: its client logs each outage once; keep the last ring
            except Exception as e:  # keep the last ring; Redis may be back at the next beat
                log.warning("cache group heartbeat failed: %s", e)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--group-listen must be HOST:PORT, not {listen!r}")
    return host, int(port)


@asynccontextmanager
async def open_group(redis, secret: str, opts: GroupOptions, cache,
                     from_store: Callable[[str], Awaitable[bytes]],
                     metrics: Metrics | None = None) -> AsyncIterator[GroupNode]:
    """Join the group (serving peers if sharing), keep the ring fresh, and
    leave it on exit."""
    node = GroupNode(redis, secret, opts, cache, from_store, metrics)
    async with trio.open_nursery() as nursery:
        address = ""
        if opts.sharing:
            host, port = _split(opts.listen)
            server = await nursery.start(_serve, host, port, node)
            if host in ("0.0.0.0", "::", "*"):
                # Listening everywhere: peers reach us at this host's address.
                host = socket.gethostbyname(socket.gethostname())
                if host.startswith("127.") or host == "::1":
                    # (Debian maps the host name to 127.0.1.1.) Every member
                    # would register as the same loopback address.
                    raise GroupError(f"this host's name resolves to {host}, which peers cannot reach: "
                                     "give --group-listen this host's network address (e.g. 10.0.0.5:9750)")
            address = f"{host}:{server.port}"
        node.membership = Membership(redis, opts.name, address, opts.weight, opts.timeout)
        node.id = node.membership.id
        node._update(await node.membership.beat(node._info()))
        # The ring before this node joined: the owners to ask before S3 for
        # what this node now owns (a restarted member may own it already).
        before = Ring({m.id: m.weight for m in node.members if m.sharing and m.id != node.id})
        node.prev_ring = before if len(before) else None
        nursery.start_soon(node._heartbeat_loop)
        try:
            yield node
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await node.membership.leave()
                    except Exception as e:
                        log.warning("leaving cache group %s failed: %s", opts.name, e)
                await node.client.aclose()
            nursery.cancel_scope.cancel()


async def _serve(host: str, port: int, node: GroupNode, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        server_cm = open_peer_server(host, port, node._secret, _Source(node), stats=node.metrics.peer_served,
                                     tls=node.tls_server)
        server = await server_cm.__aenter__()
    except OSError as e:
        raise GroupError(f"cannot serve cache group peers on {host}:{port}: {e.strerror or e}") from None
    try:
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        await server_cm.__aexit__(None, None, None)
