"""Cache-group membership, kept in the volume's Redis: no service of its own.

Each member heartbeats into two keys of the volume's database:

  grp:<name>:beat    zset  member id -> last heartbeat (unix seconds, float)
  grp:<name>:info    hash  member id -> JSON (address, weight, cache bytes, counters)

The member id is the address peers reach it at ("host:port"), so a restarted
node comes back as the same member and owns the same blocks (its disk cache
survived). A member whose heartbeat is older than the timeout is out of every
node's ring at their next refresh: the bound on how long a dead member is
asked is timeout + one heartbeat interval. A client-only node (--no-sharing)
heartbeats too, for `jfscache group status`, under an id that is not an
address, with weight 0, so it owns nothing.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def _keys(group: str) -> tuple[str, str]:
    return f"grp:{group}:beat", f"grp:{group}:info"


@dataclass
class Member:
    id: str
    address: str  # "" for a client-only node
    weight: float
    heartbeat: float
    info: dict = field(default_factory=dict)

    @property
    def sharing(self) -> bool:
        return bool(self.address)


async def list_members(r, group: str, timeout: float | None = None) -> list[Member]:
    """Members of a group, newest heartbeat first; only live ones if `timeout` is given."""
    beat, info = _keys(group)
    low = "-inf" if timeout is None else time.time() - timeout
    flat = await r.execute("ZRANGEBYSCORE", beat, low, "+inf", "WITHSCORES")
    ids = flat[0::2]
    if not ids:
        return []
    infos = await r.execute("HMGET", info, *ids)
    out = []
    for mid, score, raw in zip(ids, flat[1::2], infos):
        d = json.loads(raw) if raw else {}
        out.append(Member(mid.decode(), d.get("address", ""), float(d.get("weight", 0)), float(score), d))
    out.sort(key=lambda m: -m.heartbeat)
    return out


async def list_groups(r) -> list[str]:
    """Names of the groups that have (or had) members in this volume."""
    names, cursor = set(), b"0"
    while True:
        cursor, keys = await r.execute("SCAN", cursor, "MATCH", "grp:*:beat", "COUNT", 1000)
        names.update(k.decode()[4:-5] for k in keys)
        if cursor == b"0":
            return sorted(names)


class Membership:
    """This node's registration in a group."""

    def __init__(self, r, group: str, address: str, weight: float, timeout: float):
        self.r = r
        self.group = group
        self.address = address
        self.weight = weight if address else 0.0
        self.timeout = timeout
        self.id = address or f"client:{socket.gethostname()}:{os.getpid()}"
        self.joined = time.time()

    async def beat(self, info: dict) -> list[Member]:
        """Heartbeat with this node's current figures; returns the live members."""
        beat, key = _keys(self.group)
        now = time.time()
        record = dict(info, address=self.address, weight=self.weight, host=socket.gethostname(),
                      pid=os.getpid(), joined=self.joined)
        await self.r.pipeline([("ZADD", beat, now, self.id), ("HSET", key, self.id, json.dumps(record)),
                               # Long-dead members are forgotten, so status does not list them forever.
                               ("ZREMRANGEBYSCORE", beat, "-inf", now - max(3600.0, 10 * self.timeout))])
        return await list_members(self.r, self.group, self.timeout)

    async def leave(self) -> None:
        beat, key = _keys(self.group)
        await self.r.pipeline([("ZREM", beat, self.id), ("HDEL", key, self.id)])
