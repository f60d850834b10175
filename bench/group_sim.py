"""Cache-group placement and the group itself past one machine, by simulation.

    .venv/bin/python -m bench.group_sim [--keys 200000] [--reads-scale 1] [--ring-only] [--out bench/GROUP_SIM.md]

Sections (a)-(e) drive the real placement code (jfscache.group.ring.Ring)
with 100 members and 1,000 clients, pure computation with no network, to show
what loopback tests cannot: (a) how evenly block keys spread, (b) with mixed
weights, (c) how much of one hot file's traffic lands on one member with 1, 2
or 3 replicas, (d) how many keys move on scale events against the ideal, and
(e) what owners() costs per call.

Sections (f)-(h) drive the real GroupNode (jfscache.group.node: fetch,
fetch_as_owner and its handoff, warm/check/evict, _update and prev_ring) of
every member, joined and left through the real open_group and Membership,
under trio, with simulated links and no sockets: each member has an
in-memory stand-in for BlockCache (memory and disk LRUs), a counting object
store, an in-memory stand-in for Redis, and a stand-in PeerClient whose
requests run on the target member's _Source in-process. 1,000 clients read a Zipf-popular data
set through 100 members: (f) load per member with and without hot-block
replication (modelled here; jfscache has none), also for one hot file,
(g) keys moved and S3 fetches when the group scales 50 -> 100 -> 50 with
and without handoff, (h) the group hit rate per window after each change.

Everything but the timings in (e) is deterministic. Prints a markdown
report; --out also writes it to a file. --reads-scale scales every read count
of (f)-(h) (1: about two minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import trio
import xxhash

import jfscache.group.node as group_node
from jfscache.group.node import GroupNode, GroupOptions, _Source
from jfscache.group.peer import PeerError
from jfscache.group.ring import Ring
from jfscache.layout import DEFAULT_BLOCK_SIZE, block_key

MEMBERS = 100
CLIENTS = 1000
HOT_BLOCKS = 64                      # a 256 MiB file of 4 MiB blocks
BLOCKS_PER_SLICE = 16                # a full 64 MiB chunk written at once
GiB = 1 << 30


def member_ids(count: int, first: int = 0) -> list[str]:
    # Addresses, as members register themselves in Redis under host:port.
    return [f"10.0.{i // 250}.{i % 250 + 1}:7070" for i in range(first, first + count)]


def block_keys(count: int, first_slice: int = 1_000_000) -> list[str]:
    return [block_key("vol", first_slice + i // BLOCKS_PER_SLICE, i % BLOCKS_PER_SLICE, DEFAULT_BLOCK_SIZE)
            for i in range(count)]


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def spread(counts: list[int]) -> tuple[float, float, float]:
    """max/mean, min/mean, stddev/mean of blocks per member."""
    mean = statistics.fmean(counts)
    return max(counts) / mean, min(counts) / mean, statistics.pstdev(counts) / mean


def balance(keys: list[str]) -> list[str]:
    members = member_ids(MEMBERS)
    by_ring = Counter(Ring(dict.fromkeys(members, 1.0)).owner(k) for k in keys)
    # The yardstick is a perfectly random placement: even an ideal hash
    # leaves binomial noise of about sqrt(keys/members) per member.
    rnd = random.Random(1)
    by_chance = Counter(rnd.randrange(MEMBERS) for _ in keys)
    rows = []
    for label, counts in (("Ring (weighted HRW, xxh64)", [by_ring[m] for m in members]),
                          ("perfectly random placement", [by_chance[i] for i in range(MEMBERS)])):
        hi, lo, sd = spread(counts)
        rows.append([label, f"{hi:.3f}", f"{lo:.3f}", f"{sd:.4f}"])
    return [f"## (a) Balance: {len(keys):,} block keys over {MEMBERS} members of equal weight", "",
            f"{len(keys) / MEMBERS:,.0f} blocks per member on average.", "",
            *table(["placement", "max/mean", "min/mean", "stddev/mean"], rows)]


def weighted_balance(keys: list[str]) -> list[str]:
    # Cache sizes of 1, 2 and 4 TiB, the larger ones fewer.
    classes = [(1.0, 50), (2.0, 30), (4.0, 20)]
    weights: dict[str, float] = {}
    for weight, count in classes:
        weights.update(dict.fromkeys(member_ids(count, first=len(weights)), weight))
    counts = Counter(Ring(weights).owner(k) for k in keys)
    total = sum(weights.values())
    rows = []
    for weight, count in classes:
        expected = len(keys) * weight / total
        loads = [counts[m] / expected for m, w in weights.items() if w == weight]
        share = sum(counts[m] for m, w in weights.items() if w == weight) / len(keys)
        rows.append([f"{weight:g}", count, f"{100 * weight * count / total:.2f}%", f"{100 * share:.2f}%",
                     f"{expected:,.0f}", f"{max(loads):.3f}", f"{min(loads):.3f}", f"{statistics.pstdev(loads):.4f}"])
    return [f"## (b) Weighted balance: {len(keys):,} block keys, {MEMBERS} members of weights 1, 2 and 4", "",
            "Load = a member's blocks over its expected blocks (weight / total weight).", "",
            *table(["weight", "members", "expected share", "observed share", "expected blocks per member",
                    "max load", "min load", "stddev of load"], rows)]


def hot_spot() -> list[str]:
    members = member_ids(MEMBERS)
    ring = Ring(dict.fromkeys(members, 1.0))
    rows = []
    for blocks in (HOT_BLOCKS, 1):
        # Its own slices, so the two hot files do not share blocks.
        hot = block_keys(blocks, first_slice=7_000_000 + blocks)
        for n in (1, 2, 3):
            replicas = {k: ring.owners(k, n) for k in hot}
            pickers = {"client index mod n" if n > 1 else "(the owner)": lambda c, owners: owners[c % len(owners)]}
            if n > 1:
                rnd = random.Random(n)
                pickers["random"] = lambda c, owners: rnd.choice(owners)
            for label, pick in pickers.items():
                load = Counter(pick(c, replicas[k]) for c in range(CLIENTS) for k in hot)
                requests = CLIENTS * blocks
                busiest = max(load.values())
                # Each block lives on n members, so blocks*n members at most
                # share the traffic: that, not the group size, is the floor.
                floor = 1 / min(MEMBERS, blocks * n)
                rows.append([f"{blocks} ({blocks * DEFAULT_BLOCK_SIZE >> 20} MiB)", n, label, len(load),
                             f"{100 * busiest / requests:.2f}%", f"{100 * floor:.2f}%",
                             f"{busiest * DEFAULT_BLOCK_SIZE / GiB:,.1f}"])
    return [f"## (c) Hot spot: {CLIENTS:,} clients each read the same file once, {MEMBERS} members", "",
            "Each block lives on its n best owners; a client reads each block from the replica it picks. "
            "Floor = the busiest member's share if the file's blocks*n replicas fell on distinct members "
            "and the traffic split evenly.", "",
            *table(["hot file, blocks", "replicas n", "replica choice", "members serving", "busiest member's share",
                    "floor", "GiB served by the busiest"], rows)]


def shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {m: w / total for m, w in weights.items()}


def movement(keys: list[str]) -> list[str]:
    base = dict.fromkeys(member_ids(MEMBERS), 1.0)
    first = next(iter(base))
    events = [
        ("100 → 101 (one joins)", {**base, **dict.fromkeys(member_ids(1, first=MEMBERS), 1.0)}),
        ("100 → 99 (one leaves)", {m: w for m, w in base.items() if m != first}),
        ("100 → 150 (50 join)", {**base, **dict.fromkeys(member_ids(50, first=MEMBERS), 1.0)}),
        ("one member drains (weight 1 → 0)", {**base, first: 0.0}),
        ("one member doubles its weight (1 → 2)", {**base, first: 2.0}),
    ]
    before, before_shares = Ring(base), shares(base)
    owner_before = [before.owner(k) for k in keys]
    rows = []
    for label, after_weights in events:
        after = Ring(after_weights)
        moved = needless = 0
        for k, old in zip(keys, owner_before):
            new = after.owner(k)
            if new != old:
                moved += 1
                # A move is needed only to or from a member whose weight changed.
                if base.get(old) == after_weights.get(old) and base.get(new) == after_weights.get(new):
                    needless += 1
        # The least any placement must move: what the members gaining share gain.
        ideal = sum(max(0.0, share - before_shares.get(m, 0.0)) for m, share in shares(after_weights).items())
        rows.append([label, f"{moved / len(keys):.4f}", f"{ideal:.4f}", f"{moved / len(keys) / ideal:.3f}", needless])
    return [f"## (d) Movement on scale events: {len(keys):,} block keys, owner before vs after", "",
            "Ideal = the least any placement must move (the sum of the share gains). "
            "Needless = keys moved between two members whose weights did not change.", "",
            *table(["event", "fraction moved", "ideal", "moved/ideal", "needless moves"], rows)]


def cost() -> list[str]:
    rows = []
    keys = block_keys(500, first_slice=9_000_000)
    for count in (10, 100, 1000):
        ring = Ring(dict.fromkeys(member_ids(count), 1.0))
        row: list[object] = [count]
        for n in (1, 3):
            best = float("inf")
            # Best of a few rounds of about 0.2 s: the machine is shared, and
            # the minimum is the figure least disturbed by other work.
            for _ in range(5):
                calls, start = 0, time.perf_counter()
                while time.perf_counter() - start < 0.2:
                    for k in keys:
                        ring.owners(k, n)
                    calls += len(keys)
                best = min(best, (time.perf_counter() - start) / calls)
            row += [f"{best * 1e6:,.1f}", f"{best * 1e9 / count:,.0f}"]
        rows.append(row)
    return ["## (e) Cost of owners(): µs per call (best of 5 rounds)", "",
            "One xxh64 call and one logarithm per member with weight > 0, whatever the weights.", "",
            *table(["members", "n=1 µs/call", "n=1 ns/member", "n=3 µs/call", "n=3 ns/member"], rows)]


# ---------------------------------------------------------------------------
# (f)-(h): the group itself. Real GroupNode objects (jfscache.group.node) with
# the real Ring, fetch(), fetch_as_owner(), warm/check/evict and _update(),
# joined and left through the real open_group() and Membership; what they talk
# to is simulated in-process: a block cache with the BlockCache surface they
# use, a counting object store, Redis (FakeRedis, for membership.py), and a
# PeerClient whose requests go straight to the target member's _Source (the
# object the real peer server serves from). No sockets: open_group's peer
# server (_serve) is replaced for the duration of a run. Heartbeats are driven
# by the simulation (SimGroup.beat_all), not by time.

BLOCK = DEFAULT_BLOCK_SIZE
MEM_BLOCKS = 64            # mount default --mem-cache-size 256M: 64 blocks of 4 MiB
DISK_BLOCKS = 2560         # mount default --cache-size 10G
DATA_BLOCKS = 20_000       # the data set: 80 GiB of 4 MiB blocks
ZIPF_S = 1.1
HOT_WINDOW = 10_000        # requests per hot-detection window
HOT_THRESHOLD = 8          # peer fills of one block in a window that make it hot


class SimCache:
    """What GroupNode and _Source use of BlockCache: get(key, fetch=None),
    local, contains, evict, cached_bytes. A memory LRU and a disk LRU, counted
    in blocks. As in BlockCache, a miss with `fetch` (an owner filling) keeps
    the block on disk, and a miss without it goes to `remote` (GroupNode.fetch),
    whose second value says whether to keep it on disk (only if this member
    owns it: a requester keeps its copy in memory). No shared in-flight
    fetches: the simulation issues one request at a time."""

    def __init__(self, mem: OrderedDict | None = None, disk: OrderedDict | None = None):
        self.mem: OrderedDict[str, bytes] = OrderedDict(mem or ())
        self.disk: OrderedDict[str, bytes] = OrderedDict(disk or ())
        self.remote = None

    @staticmethod
    def _put(tier: OrderedDict, cap: int, key: str, data: bytes) -> None:
        tier[key] = data
        tier.move_to_end(key)
        if len(tier) > cap:
            tier.popitem(last=False)

    async def local(self, key: str) -> bytes | None:
        for tier in (self.mem, self.disk):
            data = tier.get(key)
            if data is not None:
                tier.move_to_end(key)
                return data
        return None

    def contains(self, key: str) -> bool:
        return key in self.mem or key in self.disk

    def evict(self, key: str) -> None:
        self.mem.pop(key, None)
        self.disk.pop(key, None)

    def cached_bytes(self) -> int:
        return (len(self.mem) + len(self.disk)) * BLOCK

    async def get(self, key: str, fetch=None) -> bytes:
        data = self.mem.get(key)
        if data is not None:
            self.mem.move_to_end(key)
            return data
        data = self.disk.get(key)
        if data is None:
            if fetch is not None:
                data, keep = await fetch(key), True
            else:
                data, keep = await self.remote(key)
            if keep:
                self._put(self.disk, DISK_BLOCKS, key, data)
        else:
            self.disk.move_to_end(key)
        self._put(self.mem, MEM_BLOCKS, key, data)
        return data


class SimLink:
    """PeerClient's interface for one member, over in-process calls: a request
    to a live member runs on its _Source, as the peer server would; a request
    to a member that is gone fails as a refused connection, and a member that
    is gone counts as in back-off (available() is False). Bytes of blocks
    sent to peers are counted against the member that sends them."""

    def __init__(self, group: "SimGroup"):
        self.group = group

    def available(self, addr: str) -> bool:
        return addr in self.group.nodes

    def _source(self, addr: str) -> _Source:
        source = self.group.sources.get(addr)
        if source is None:
            self.group.peer_failures += 1
            raise PeerError(f"{addr}: connection refused (the member is gone)", addr=addr)
        return source

    async def get(self, addr: str, key: str, off: int = 0, length: int = -1, *,
                  fill: bool = True) -> bytes | None:
        source = self._source(addr)
        try:
            data = await (source.fill(key) if fill else source.local(key))
        except Exception as e:  # the peer server answers ST_ERROR: a remote PeerError
            raise PeerError(f"{addr}: peer answered: {e!r}", addr=addr, remote=True) from e
        if data is not None:
            self.group.sent(addr, key, fill)
        return data

    async def get_replica(self, addr: str, key: str, primary: str) -> bytes:
        """Sim only (jfscache has no replicas): a replica serves a hot block,
        filling its own copy (on disk) from the primary owner on a miss."""
        node = self.group.nodes.get(addr)
        if node is None:
            self.group.peer_failures += 1
            raise PeerError(f"{addr}: connection refused (the member is gone)", addr=addr)
        data = await node.cache.get(key, fetch=lambda k: self.group.fill_replica(node, k, primary))
        self.group.sent(addr, key, True)
        return data

    async def warm(self, addr: str, key: str) -> tuple[int, bool]:
        source = self._source(addr)
        cached = source.contains(key)
        await source.fill(key)
        return BLOCK, cached

    async def check(self, addr: str, keys: list[str]) -> list[bool]:
        source = self._source(addr)
        return [source.contains(k) for k in keys]

    async def evict(self, addr: str, keys: list[str]) -> int:
        source, n = self._source(addr), 0
        for k in keys:
            if source.contains(k):
                source.evict(k)
                n += 1
        return n

    async def aclose(self) -> None:
        pass


class FakeRedis:
    """The Redis commands membership.py sends (ZADD, HSET, ZREMRANGEBYSCORE,
    ZREM, HDEL, ZRANGEBYSCORE ... WITHSCORES, HMGET), in memory, with
    replies shaped as the real client returns them (bytes)."""

    def __init__(self):
        self.zsets: dict[str, dict[str, float]] = {}
        self.hashes: dict[str, dict[str, bytes]] = {}

    async def execute(self, *command):
        return self._do(*command)

    async def pipeline(self, commands: list[tuple]) -> list:
        return [self._do(*c) for c in commands]

    @staticmethod
    def _str(x) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    def _do(self, op: str, key: str, *args):
        zset, hash_ = self.zsets.setdefault(key, {}), self.hashes.setdefault(key, {})
        if op == "ZADD":
            zset[self._str(args[1])] = float(args[0])
            return 1
        if op == "HSET":
            hash_[self._str(args[0])] = args[1].encode() if isinstance(args[1], str) else args[1]
            return 1
        if op == "ZREM":
            return int(zset.pop(self._str(args[0]), None) is not None)
        if op == "HDEL":
            return int(hash_.pop(self._str(args[0]), None) is not None)
        if op == "HMGET":
            return [hash_.get(self._str(f)) for f in args]
        low, high = float(self._str(args[0])), float(self._str(args[1]))
        inside = sorted((s, m) for m, s in zset.items() if low <= s <= high)
        if op == "ZREMRANGEBYSCORE":
            for _, m in inside:
                del zset[m]
            return len(inside)
        if op == "ZRANGEBYSCORE":
            return [x for s, m in inside for x in (m.encode(), repr(s).encode())]
        raise NotImplementedError(op)


async def _no_server(host: str, port: int, node: GroupNode, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Stands in for jfscache.group.node._serve in open_group: peers reach a
    member through SimLink, so there is no socket to listen on."""
    task_status.started(SimpleNamespace(port=port))
    await trio.sleep_forever()


class SimGroup:
    """Members (real GroupNodes, joined and left through the real open_group
    and Membership over FakeRedis), their caches, the store, and counters.

    A member joins as `jfscache mount --cache-group` does: open_group
    registers it, its first heartbeat returns the members registered so far,
    and open_group sets its prev_ring; then beat_all() runs one heartbeat of
    every member (the body of GroupNode._heartbeat_loop), which is how the
    others learn of it. Leaving exits open_group (Membership.leave).

    handoff=False sets every node's prev_ring to None after each join,
    leave and heartbeat, so fetch_as_owner goes straight to the store.
    `pinned` (member -> Ring) keeps those members' prev_ring at a given ring
    whatever the heartbeats do: the ideal handoff. replicas > 1 models
    hot-block replication, which jfscache does not have: a block whose owners
    served more than HOT_THRESHOLD peer fills in the current or previous
    HOT_WINDOW-request window is hot, and a requester missing a hot block asks
    owners(key, replicas)[client id % replicas]; a replica fills from the
    primary owner. keep_hot=True models the cheaper alternative: a requester
    keeps a hot block it got from the owner on its own disk, as if it owned it."""

    def __init__(self, *, replicas: int = 1, handoff: bool = True, keep_hot: bool = False):
        self.replicas, self.handoff, self.keep_hot = replicas, handoff, keep_hot
        self.redis = FakeRedis()
        self.nursery: trio.Nursery | None = None
        self.nodes: dict[str, GroupNode] = {}
        self.sources: dict[str, _Source] = {}
        self.pinned: dict[str, Ring] = {}
        self._leave: dict[str, trio.Event] = {}
        self._gone: dict[str, trio.Event] = {}
        self.serving: list[str] = []          # the members clients read through
        self.client = 0                        # the client whose read is in progress
        self.served: Counter[str] = Counter()  # bytes sent to peers, per member
        self.stored: Counter[str] = Counter()  # bytes fetched from the store, per member
        self.store_gets = self.refetches = self.handoffs = self.replica_reads = 0
        self.peer_failures = self.requests = self.hits = self.window = 0
        self.fetched: set[str] = set()         # every block ever fetched from the store
        self.fills: Counter[str] = Counter()   # peer fills per block in this hot window
        self.hot: dict[str, int] = {}          # block -> last window it is hot in
        self.sent_blocks: Counter[tuple[str, str]] = Counter()  # (member, block) -> times sent to peers

    @classmethod
    @asynccontextmanager
    async def open(cls, **kw):
        g = cls(**kw)
        serve, group_node._serve = group_node._serve, _no_server
        try:
            async with trio.open_nursery() as nursery:
                g.nursery = nursery
                yield g
                nursery.cancel_scope.cancel()
        finally:
            group_node._serve = serve

    # ---- membership, through the real code ---------------------------------
    def _from_store(self, mid: str):
        async def from_store(key: str) -> bytes:
            self.store_gets += 1
            self.stored[mid] += BLOCK
            if key in self.fetched:
                self.refetches += 1
            else:
                self.fetched.add(key)
            return key.encode()
        return from_store

    async def _member(self, mid: str, cache: SimCache, weight: float, leave: trio.Event, gone: trio.Event,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Heartbeats are driven by beat_all(), so the loop's own never fires;
        # the timeout is as long, since simulated time is not wall time.
        opts = GroupOptions("sim", listen=mid, weight=weight, heartbeat=1e9, timeout=1e9)
        try:
            async with group_node.open_group(self.redis, "sim-secret", opts, cache, self._from_store(mid)) as node:
                await node.client.aclose()    # the real PeerClient, never used
                node.client = SimLink(self)
                cache.remote = lambda key: self.remote(node, key)
                self.nodes[node.id], self.sources[node.id] = node, _Source(node)
                task_status.started(node)
                await leave.wait()
        finally:
            gone.set()

    async def join(self, mid: str, cache: SimCache | None = None, weight: float = 1.0) -> GroupNode:
        self._leave[mid], self._gone[mid] = trio.Event(), trio.Event()
        node = await self.nursery.start(self._member, mid, cache or SimCache(), weight,
                                        self._leave[mid], self._gone[mid])
        self._after_change()
        return node

    async def leave(self, mid: str) -> None:
        del self.nodes[mid], self.sources[mid]   # unreachable from now on
        self._leave.pop(mid).set()
        await self._gone.pop(mid).wait()          # open_group's exit: Membership.leave()
        self._after_change()

    async def beat(self, mids: list[str]) -> None:
        """One heartbeat of these members, as in GroupNode._heartbeat_loop."""
        for mid in mids:
            node = self.nodes[mid]
            node._update(await node.membership.beat(node._info()))
        self._after_change()

    async def beat_all(self) -> None:
        await self.beat(list(self.nodes))

    def _after_change(self) -> None:
        for mid, node in self.nodes.items():
            if not self.handoff:
                node.prev_ring = None
            elif mid in self.pinned:
                node.prev_ring = self.pinned[mid]

    async def form(self, mids: list[str], snap: tuple[dict, set] | None = None) -> None:
        """Members join one after another, then all heartbeat: a formed group, caches from `snap`."""
        caches, fetched = snap or ({}, set())
        for mid in mids:
            mem, disk = caches.get(mid, (None, None))
            await self.join(mid, SimCache(mem, disk))
        await self.beat_all()
        self.serving = list(mids)
        self.fetched = set(fetched)

    def snapshot(self) -> tuple[dict, set]:
        return ({mid: (OrderedDict(n.cache.mem), OrderedDict(n.cache.disk)) for mid, n in self.nodes.items()},
                set(self.fetched))

    # ---- the data path ------------------------------------------------------
    def sent(self, addr: str, key: str, fill: bool) -> None:
        self.served[addr] += BLOCK
        self.sent_blocks[addr, key] += 1
        if not fill:
            self.handoffs += 1     # a get without fill: fetch_as_owner asking a previous owner
            return
        self.fills[key] += 1
        if self.fills[key] > HOT_THRESHOLD:
            self.hot[key] = self.window + 1

    async def fill_replica(self, node: GroupNode, key: str, primary: str) -> bytes:
        if node.client.available(primary):
            try:
                return await node.client.get(primary, key, fill=True)
            except PeerError:
                pass
        return await node.from_store(key)

    async def remote(self, node: GroupNode, key: str) -> tuple[bytes, bool]:
        """BlockCache.remote: GroupNode.fetch, with replicas in front when modelled."""
        if self.replicas > 1 and self.hot.get(key, -1) >= self.window:
            owners = node.ring.owners(key, self.replicas)
            target = owners[self.client % len(owners)] if owners else None
            if target is not None and target != owners[0]:
                self.replica_reads += 1
                if target == node.id:   # this member is the replica: its copy goes to disk
                    return await self.fill_replica(node, key, owners[0]), True
                if node.client.available(target):
                    try:
                        return await node.client.get_replica(target, key, owners[0]), False
                    except PeerError:
                        pass
        if self.keep_hot and self.hot.get(key, -1) >= self.window:
            return (await node.fetch(key))[0], True
        return await node.fetch(key)

    async def read(self, client: int, key: str) -> bool:
        """One client reads one block through its member; True if no store fetch happened."""
        if self.requests % HOT_WINDOW == 0:
            self.window += 1
            self.fills.clear()
        self.requests += 1
        self.client = client
        before = self.store_gets
        data = await self.nodes[self.serving[client % len(self.serving)]].cache.get(key)
        if data != key.encode():
            raise AssertionError(f"read {key!r}, got {bytes(data[:60])!r}")
        hit = self.store_gets == before
        self.hits += hit
        return hit

    async def run(self, reads, window: int) -> list[tuple[float, dict[str, int]]]:
        """Per window: the hit rate and the load per member in it."""
        out, hits, n = [], 0, 0
        base = Counter(self.served) + Counter(self.stored)
        for client, key in reads:
            hits += await self.read(client, key)
            n += 1
            if n == window:
                now = Counter(self.served) + Counter(self.stored)
                out.append((hits / n, {m: now[m] - base[m] for m in self.nodes}))
                base, hits, n = now, 0, 0
        if n:
            now = Counter(self.served) + Counter(self.stored)
            out.append((hits / n, {m: now[m] - base[m] for m in self.nodes}))
        return out


class Zipf:
    """DATA_BLOCKS block keys, popularity by rank ~ rank**-s, and seeded read streams."""

    def __init__(self, blocks: int = DATA_BLOCKS, s: float = ZIPF_S):
        self.keys = block_keys(blocks, first_slice=2_000_000)
        self.cum = list(itertools.accumulate(rank ** -s for rank in range(1, blocks + 1)))

    def reads(self, seed: int, count: int) -> list[tuple[int, str]]:
        rng = random.Random(seed)
        clients = [rng.randrange(CLIENTS) for _ in range(count)]
        return list(zip(clients, rng.choices(self.keys, cum_weights=self.cum, k=count)))


def gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f}"


def load_stats(windows: list[tuple[float, dict[str, int]]], members: list[str]) -> dict:
    total = Counter()
    peak = 0.0
    for _, w in windows:
        total.update(w)
        mean = sum(w.get(m, 0) for m in members) / len(members)
        if mean:
            peak = max(peak, max(w.get(m, 0) for m in members) / mean)
    loads = [total[m] for m in members]
    mean = statistics.fmean(loads)
    return {"max": max(loads), "mean": mean, "ratio": max(loads) / mean if mean else 0.0,
            "share": max(loads) / sum(loads) if sum(loads) else 0.0, "peak": peak}


async def warm_check_evict(g: SimGroup, members: list[str]) -> str:
    """The warmup path (GroupNode.warm, check, evict) through the same links, as a consistency check."""
    node = g.nodes[members[0]]
    keys = block_keys(HOT_BLOCKS, first_slice=8_000_000)
    s0 = g.store_gets
    first = [await node.warm(k) for k in keys]
    s1 = g.store_gets
    again = [await node.warm(k) for k in keys]
    held = await node.check(keys)
    evicted = await node.evict(keys)
    after = await node.check(keys)
    owners = {o for o, _ in held}
    ok = (s1 - s0 == len(keys) and g.store_gets == s1 and not any(first) and all(again)
          and all(f for _, f in held) and evicted == len(keys) and not any(f for _, f in after))
    if not ok:
        raise AssertionError(f"warm/check/evict: {s1 - s0} fetches, {first=}, {again=}, {held=}, {evicted=}, {after=}")
    return (f"Consistency check of the warmup path over the same links: member {members[0]} warms a "
            f"{len(keys)}-block file (`GroupNode.warm`): {s1 - s0} S3 fetches by {len(owners)} owners; warming "
            f"again fetches nothing and reports every block cached; `check` finds every block at its owner; "
            f"`evict` drops {evicted}, and `check` then finds none.")


def group_load(zipf: Zipf, warm: int, measure: int) -> list[str]:
    return trio.run(_group_load, zipf, warm, measure)


async def _group_load(zipf: Zipf, warm: int, measure: int) -> list[str]:
    members = member_ids(MEMBERS)
    async with SimGroup.open() as g:
        await g.form(members)
        await g.run(zipf.reads(1, warm), warm)
        snap = g.snapshot()
    async with SimGroup.open() as g:
        await g.form(members, snap)
        warmup = await warm_check_evict(g, members)
    rows = []
    for r, keep_hot in ((1, False), (2, False), (3, False), (1, True)):
        async with SimGroup.open(replicas=r, keep_hot=keep_hot) as g:
            await g.form(members, snap)
            s = load_stats(await g.run(zipf.reads(2, measure), HOT_WINDOW), members)
        FINDINGS["zipf", r, keep_hot] = s
        if r == 1 and not keep_hot:
            loads = {m: g.served[m] + g.stored[m] for m in members}
            busiest = max(members, key=loads.get)
            rank = {k: i + 1 for i, k in enumerate(zipf.keys)}
            top = sorted(((n, k) for (m, k), n in g.sent_blocks.items() if m == busiest), reverse=True)[:3]
            FINDINGS["zipf busiest"] = (busiest, [(rank.get(k), n) for n, k in top],
                                        sum(n for n, _ in top) * BLOCK / loads[busiest])
        rows.append([f"Zipf s={ZIPF_S}, {DATA_BLOCKS:,} blocks",
                     "1, requesters keep hot blocks on disk" if keep_hot else r,
                     f"{s['ratio']:.2f}", f"{s['peak']:.2f}", mib(s["max"]), mib(s["mean"]),
                     f"{100 * s['share']:.2f}%", sum(h >= g.window for h in g.hot.values()),
                     f"{g.replica_reads:,}", f"{g.store_gets:,}", f"{100 * g.hits / g.requests:.2f}%"])
    for blocks in (1, HOT_BLOCKS):
        hot = block_keys(blocks, first_slice=7_000_000 + blocks)
        rng = random.Random(blocks)
        # The whole group starts the file at once: round after round, every
        # client (in a new random order each round) reads the next block.
        order = []
        for k in hot:
            clients = list(range(CLIENTS))
            rng.shuffle(clients)
            order += [(c, k) for c in clients]
        for r in (1, 2, 3):
            async with SimGroup.open(replicas=r) as g:
                await g.form(members, snap)
                s = load_stats(await g.run(order, HOT_WINDOW), members)
            FINDINGS["hot", blocks, r] = s
            rows.append([f"hot file, {blocks} block{'s' * (blocks > 1)} ({blocks * BLOCK >> 20} MiB)", r,
                         f"{s['ratio']:.2f}", f"{s['peak']:.2f}", mib(s["max"]), mib(s["mean"]),
                         f"{100 * s['share']:.2f}%", sum(h >= g.window for h in g.hot.values()),
                         f"{g.replica_reads:,}", f"{g.store_gets:,}", f"{100 * g.hits / g.requests:.2f}%"])
    return [f"## (f) Load per member with real GroupNodes: {MEMBERS} members, {CLIENTS:,} clients, "
            f"replication of hot blocks modelled", "",
            f"Each client reads through member `client % {MEMBERS}`. Members have the mount defaults: "
            f"{MEM_BLOCKS} blocks (256 MiB) of memory, {DISK_BLOCKS:,} blocks (10 GiB) of disk, LRU. "
            f"Load of a member = bytes it sent to peers + bytes it fetched from the store. "
            f"Zipf rows: {warm:,} reads to warm the group, then {measure:,} reads measured "
            f"({measure // CLIENTS} per client). Hot-file rows: on the same warm group, every client "
            f"reads the file once, all clients block by block together ({CLIENTS:,} reads per block). "
            f"Replicas r > 1 (not in jfscache, modelled here): a block whose owner served more than "
            f"{HOT_THRESHOLD} peer fills in a {HOT_WINDOW:,}-read window is hot for that window and the next; "
            f"a member missing a hot block asks owners(key, r)[client id % r], and a replica fills from the "
            f"primary. The last Zipf row has no replicas but a member that gets a hot block from its owner "
            f"keeps it on its own disk (every requester becomes a replica). Peak = the largest max/mean over "
            f"{HOT_WINDOW:,}-read windows (one window for the 1-block file).", "",
            warmup, "",
            *table(["workload", "replicas r", "max/mean load", "peak window max/mean", "busiest member MiB",
                    "mean MiB", "busiest's share", "hot blocks at end", "reads sent to a replica",
                    "S3 fetches", "group hit rate"], rows)]


def _held(g: SimGroup, keys: list[str], old: list[str | None], new: list[str | None]) -> tuple[int, int]:
    moved = held = 0
    for k, o, n in zip(keys, old, new):
        if o != n:
            moved += 1
            node = g.nodes.get(o)
            held += node is not None and node.cache.contains(k)
    return moved, held


def group_scaling(zipf: Zipf, warm: int, phase: int, window: int) -> tuple[list[str], list[str]]:
    return trio.run(_group_scaling, zipf, warm, phase, window)


async def _group_scaling(zipf: Zipf, warm: int, phase: int, window: int) -> tuple[list[str], list[str]]:
    a, b = member_ids(50), member_ids(50, first=50)
    async with SimGroup.open() as g:
        await g.form(a)
        await g.run(zipf.reads(3, warm - 2 * window), warm)
        steady = [h for h, _ in await g.run(zipf.reads(4, 2 * window), window)]
        snap = g.snapshot()
    keys = zipf.keys
    ring_a, ring_ab = Ring(dict.fromkeys(a, 1.0)), Ring(dict.fromkeys(a + b, 1.0))
    own_a, own_ab = [ring_a.owner(k) for k in keys], [ring_ab.owner(k) for k in keys]
    up_reads, down_reads = zipf.reads(5, phase), zipf.reads(6, phase)
    drain, steps = 2 * window, 5
    no, real, ideal = ("no handoff (prev_ring = None)", False), ("handoff, real code", True), \
        ("handoff, joiners keep the 50-member ring (ideal)", True)
    # (variant, how the joiners leave or None to stop after the scale-up, join steps, show the scale-up)
    variants = [(no, "leave", 1, True), (real, "leave", 1, True), (no, "drain", 1, False),
                (real, "drain", 1, False), (ideal, "drain", 1, True), (real, None, steps, True),
                (ideal, None, steps, True)]
    rows, timeline, after_up = [], [], {}
    for (label, handoff), leave, nsteps, show_up in variants:
        async with SimGroup.open(handoff=handoff) as g:
            if not show_up and label in after_up:
                # The same scale-up as an earlier run of this variant: start from where it ended.
                await g.form(a + b, after_up[label])
                up, c1 = [], (g.store_gets, g.refetches, g.handoffs)
            else:
                await g.form(a, snap)
                if label == ideal[0]:
                    g.pinned = dict.fromkeys(b, ring_a)
                # 50 -> 100: the joiners register one after another, then every
                # member heartbeats; in steps, `steps` groups `window` reads apart.
                c0 = (g.store_gets, g.refetches, g.handoffs)
                up, done, size = [], 0, len(b) // nsteps
                for step in range(nsteps):
                    for m in b[step * size:(step + 1) * size]:
                        await g.join(m)
                    await g.beat_all()
                    g.serving = list(g.nodes)
                    if step == 0:
                        moved_up, held_up = _held(g, keys, own_a, own_ab)
                    if step < nsteps - 1:
                        up += await g.run(up_reads[done:done + window], window)
                        done += window
                up += await g.run(up_reads[done:], window)
                c1 = (g.store_gets, g.refetches, g.handoffs)
                g.pinned = {}
                if nsteps == 1:
                    after_up[label] = g.snapshot()
            events = []
            if show_up:
                events.append(("50 → 100" + (f" in {nsteps} steps, {window:,} reads apart" if nsteps > 1 else ""),
                               moved_up, held_up, c0, c1, up))
            if leave is not None:
                # 100 -> 50: the joiners leave (unmount), at once or after draining (weight 0) for a while.
                moved_down, held_down = _held(g, keys, own_ab, own_a)
                down, rest = [], down_reads
                if leave == "drain":
                    # The drainers' records change first, then everyone's next beat sees them.
                    for m in b:
                        g.nodes[m].membership.weight = 0.0
                    await g.beat(b)
                    await g.beat_all()
                    down, rest = await g.run(down_reads[:drain], window), down_reads[drain:]
                for m in b:
                    await g.leave(m)
                await g.beat_all()
                g.serving = a
                down += await g.run(rest, window)
                c2 = (g.store_gets, g.refetches, g.handoffs)
                events.append(("100 → 50, " + ("leave at once" if leave == "leave" else
                                               f"drain {drain:,} reads, then leave"),
                               moved_down, held_down, c1, c2, down))
        for event, moved, held, (s0, r0, h0), (s1, r1, h1), hits in events:
            FINDINGS["scale", event, label] = dict(moved=moved, held=held, fetches=s1 - s0, refetches=r1 - r0,
                                                   handoffs=h1 - h0, worst=min(h for h, _ in hits),
                                                   last=hits[-1][0])
            rows.append([event, label, f"{moved:,} ({100 * moved / len(keys):.1f}%)", f"{held:,}",
                         f"{s1 - s0:,}", gib((s1 - s0) * BLOCK), f"{r1 - r0:,}", f"{h1 - h0:,}",
                         f"{100 * min(h for h, _ in hits):.1f}%"])
            timeline.append((label, event, hits))
    order = lambda event: (not event.startswith("50"), " steps" in event)  # noqa: E731
    rows.sort(key=lambda r: order(r[0]))
    timeline.sort(key=lambda t: order(t[1]))
    base = statistics.fmean(steady)
    FINDINGS["steady"], FINDINGS["phase"] = base, phase
    moves = [f"## (g) Scale events with real GroupNodes: 50 → 100 → 50 members, {CLIENTS:,} clients, "
             f"Zipf s={ZIPF_S} over {DATA_BLOCKS:,} blocks", "",
             f"The 50 members first serve {warm:,} reads. Then 50 fresh members join: one after another each "
             f"enters the real `open_group` (its first heartbeat lists the members registered so far, and "
             f"open_group sets its prev_ring to them), then every member heartbeats once (`_update` with all "
             f"100); {phase:,} reads. Then the 50 joiners leave (open_group's exit, `Membership.leave`), every "
             f"member heartbeats; {phase:,} reads. Clients re-spread over the members at each change. "
             f"Moved = data-set blocks whose owner changed; held = of those, blocks the old owner held at the "
             f"change (what a handoff can save). S3 refetches = fetches of blocks the group had fetched before "
             f"(the avoidable part; the other fetches are first reads of the Zipf tail, "
             f"{100 * (1 - base):.1f}% of reads in the steady state before the change). Handoffs = blocks an "
             f"owner got from a previous owner (a get without fill). \"No handoff\" sets every node's prev_ring "
             f"to None after each join, leave and heartbeat. \"Joiners keep the 50-member ring\" pins the "
             f"joiners' prev_ring to the ring before the scale-up whatever the heartbeats do: the ideal handoff. "
             f"Drain = the joiners heartbeat with weight 0 (they serve what they hold and own nothing) for "
             f"{drain:,} reads before they leave. In steps = 5 groups of 10 joiners, {window:,} reads apart. A "
             f"member that left is unreachable at once (the real PeerClient finds out by one failed request per "
             f"back-off period).", "",
             *table(["event", "variant", "keys moved", "moved & held", "S3 fetches", "S3 GiB", "S3 refetches",
                     "handoffs", "worst window hit rate"], rows)]
    header = ["variant", "event"] + [f"w{i + 1}" for i in range(-(-phase // window))]
    trows = [["(steady state before, 50 members)", "", *(f"{100 * h:.1f}" for h in steady)]]
    trows += [[label, event, *(f"{100 * h:.1f}" for h, _ in hits)] for label, event, hits in timeline]
    dip = [f"## (h) Hit-rate dip after the change: group hit rate (%) per {window:,}-read window", "",
           f"Group hit rate = reads served without any S3 fetch (by the requester's memory, its own disk as "
           f"owner, the owner, or a previous owner). w1 is the first {window:,} reads after the change "
           f"({window // CLIENTS} per client); in the drain rows the joiners leave after w{drain // window}; "
           f"in the stepped joins the last joiners arrive after w{steps - 1}.", "",
           *table(header, trows)]
    return moves, dip


FINDINGS: dict = {}   # figures of (f)-(h), for the summary


def findings() -> list[str]:
    f = FINDINGS
    z1, z2, z3, zk = (f["zipf", 1, False], f["zipf", 2, False], f["zipf", 3, False], f["zipf", 1, True])
    busiest, top, top_share = f["zipf busiest"]
    h1, h3 = f["hot", 1, 1], f["hot", 1, 3]
    h64, h64_3 = f["hot", HOT_BLOCKS, 1], f["hot", HOT_BLOCKS, 3]
    scale = {k[1:]: v for k, v in f.items() if k[0] == "scale"}

    def pick(event: str, variant: str) -> dict:
        return next(v for (e, l), v in scale.items() if e.startswith(event) and l.startswith(variant))
    none_up, real_up, ideal_up = pick("50 → 100", "no handoff"), pick("50 → 100", "handoff, real"), \
        pick("50 → 100", "handoff, joiners keep")
    real_steps, ideal_steps = pick("50 → 100 in", "handoff, real"), pick("50 → 100 in", "handoff, joiners keep")
    abrupt = pick("100 → 50, leave", "handoff, real")
    drained, drained_no = pick("100 → 50, drain", "handoff, real"), pick("100 → 50, drain", "no handoff")
    out = ["## What (f)-(h) show", "",
           f"- Load, Zipf: without replicas the busiest member carries {z1['ratio']:.2f}x the mean load "
           f"({mib(z1['max'])} vs {mib(z1['mean'])} MiB). Its load is a few blocks of popularity rank "
           f"{', '.join(str(r) for r, _ in top)}, sent to peers {', '.join(str(n) for _, n in top)} times "
           f"({100 * top_share:.0f}% of its load): blocks hot enough to matter but not hot enough to stay in "
           f"every requester's 256 MiB memory, so all members fetch them again and again. Replicas spread "
           f"them: r=2 gives {z2['ratio']:.2f}x, r=3 {z3['ratio']:.2f}x (more replicas of different hot blocks "
           f"land on the same members), and the mean load does not change ({mib(z1['mean'])} → "
           f"{mib(z2['mean'])} MiB): replication moves load, it does not remove it. Keeping hot blocks on the "
           f"requester's own disk instead gives {zk['ratio']:.2f}x and removes load: mean "
           f"{mib(zk['mean'])} MiB ({100 * (zk['mean'] / z1['mean'] - 1):+.0f}%), busiest {mib(zk['max'])} MiB "
           f"({100 * (zk['max'] / z1['max'] - 1):+.0f}%).",
           f"- Load, one hot file: the requester's memory absorbs the {CLIENTS // MEMBERS} clients of a member, "
           f"so a block's owner serves it once per member, not once per client: the owner of a 1-block file "
           f"sends {mib(h1['max'])} MiB ({MEMBERS} members x 4 MiB), {h1['max'] * 8 / 10e9:.2f} s of a 10 Gbit/s NIC; "
           f"3 replicas cut that to {mib(h3['max'])} MiB. For the 64-block file the busiest member sends "
           f"{mib(h64['max'])} MiB without replicas and {mib(h64_3['max'])} MiB with 3 (peak window "
           f"{h64['peak']:.1f}x → {h64_3['peak']:.1f}x the mean). Section (c)'s GiB figures assume every client "
           f"reads from the owner; with members caching for their clients they are {CLIENTS // MEMBERS}x smaller.",
           f"- Scale-up 50 → 100: {none_up['moved']:,} of {DATA_BLOCKS:,} blocks change owner and "
           f"{none_up['held']:,} of them were held. Without handoff the new owners refetch "
           f"{none_up['refetches']:,} blocks ({gib(none_up['refetches'] * BLOCK)} GiB) from S3 in "
           f"the {f['phase']:,} reads after the join, and the group hit rate falls from {100 * f['steady']:.1f}% "
           f"to {100 * none_up['worst']:.1f}% (still {100 * none_up['last']:.1f}% at the end). The real code "
           f"hands off {real_up['handoffs']:,} blocks and refetches {real_up['refetches']:,} (worst window "
           f"{100 * real_up['worst']:.1f}%): open_group gives a joiner the ring of the members its first "
           f"heartbeat lists, but its next heartbeat lists the members that registered after it, the ring "
           f"changes, and `_update` replaces prev_ring with the ring of that first heartbeat, in which the "
           f"joiner already owns its blocks. Only a joiner whose ring does not change after its first "
           f"heartbeat (the last of a batch) keeps the handoff. In 5 steps the real code hands off "
           f"{real_steps['handoffs']:,} blocks and refetches {real_steps['refetches']:,}. With the ideal "
           f"handoff (joiners keep the 50-member ring) the joiners refetch {ideal_up['refetches']:,} blocks "
           f"({ideal_steps['refetches']:,} in 5 steps) and the hit rate does not dip "
           f"(worst window {100 * ideal_up['worst']:.1f}%).",
           f"- Scale-down 100 → 50: the 50 original members still hold most of what they had before the "
           f"scale-up (10 GiB disks, nothing evicted), so leaving without a drain refetches only "
           f"{abrupt['refetches']:,} "
           f"blocks, what the joiners fetched first. Draining first (weight 0) lets the remaining owners take "
           f"{drained['handoffs']:,} blocks from the drainers ({drained['refetches']:,} refetches left, of blocks "
           f"not read during the drain); without handoff a drain saves nothing ({drained_no['refetches']:,})."]
    return out


def blob_hash(path: str) -> str:
    """The file's git blob id (what `git hash-object PATH` prints), short: which version was simulated."""
    data = (Path(__file__).resolve().parent.parent / path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:12]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=200_000, help="block keys for balance and movement")
    ap.add_argument("--reads-scale", type=float, default=1.0, help="multiply the read counts of (f)-(h)")
    ap.add_argument("--ring-only", action="store_true", help="only (a)-(e), the ring without the group")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    args = ap.parse_args()
    command = "python -m bench.group_sim" + (f" --keys {args.keys}" if args.keys != 200_000 else "") + \
        (f" --reads-scale {args.reads_scale:g}" if args.reads_scale != 1 else "") + \
        (" --ring-only" if args.ring_only else "") + (f" --out {args.out}" if args.out else "")
    keys = block_keys(args.keys)

    def reads(n: int) -> int:
        return max(1000, round(n * args.reads_scale / 1000) * 1000)

    lines = ["# Cache-group placement and the group, simulated: 100 members, 1,000 clients",
             f"Produced by `.venv/bin/{command}` from the repo root on {dt.date.today()}: "
             f"Python {platform.python_version()}, trio {trio.__version__}, xxhash {xxhash.VERSION}, "
             f"{cpu_model()} ({os.cpu_count()} CPUs, shared with other work).",
             "(a)-(e): pure computation over the real `jfscache.group.ring.Ring`. (f)-(h): the real "
             "`jfscache.group.node.GroupNode` of every member (fetch, fetch_as_owner with its handoff, "
             "warm/check/evict, `_update` keeping prev_ring), joining and leaving through the real `open_group` "
             "and `Membership`, under trio, over simulated links and an in-memory Redis: no sockets. "
             "All figures but the timings in (e) and the run times are deterministic.",
             f"Code simulated: `jfscache/group/node.py` with `git hash-object` {blob_hash('jfscache/group/node.py')}, "
             f"`ring.py` {blob_hash('jfscache/group/ring.py')}. Quicker runs: `--ring-only` for (a)-(e), "
             f"`--reads-scale 0.2` for (f)-(h) with a fifth of the reads.", ""]
    sections = [("balance", lambda: balance(keys)), ("weighted balance", lambda: weighted_balance(keys)),
                ("hot spot", hot_spot), ("movement", lambda: movement(keys)), ("cost", cost)]
    if not args.ring_only:
        zipf = Zipf()
        scaled: dict[str, list[str]] = {}

        def scaling(part: str) -> list[str]:
            if not scaled:
                scaled["moves"], scaled["dip"] = group_scaling(zipf, reads(200_000), reads(50_000), reads(5_000))
            return scaled[part]

        sections += [("group load", lambda: group_load(zipf, reads(200_000), reads(100_000))),
                     ("group scaling", lambda: scaling("moves")), ("hit-rate dip", lambda: scaling("dip")),
                     ("summary", findings)]
    timings = []
    for name, run in sections:
        start = time.perf_counter()
        lines += run() + [""]
        timings.append(f"{name} {time.perf_counter() - start:.0f} s")
        # Progress on stderr, so stdout stays the report alone.
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lines += [f"Run time per section: {', '.join(timings)}.", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
