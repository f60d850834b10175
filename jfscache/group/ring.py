"""Block placement in a cache group: weighted rendezvous (HRW) hashing.

Every member scores every key and the highest score owns it. Compared with a
consistent-hash ring of virtual nodes this needs no per-member token tables,
the n best scores are the n owners of a replicated hot block (no rehashing or
attempt counters), and a membership change moves only the keys whose best
member changed: those of a member that left, or those a new member now wins.
The price is one hash per member per lookup, fine for groups of up to a few
hundred members (bench/GROUP_SIM.md has the cost per call).

Placement must be identical on every node and across versions of jfscache,
since a node that disagrees about an owner misses in the group and refetches
from S3. So the ranking depends only on member ids, weights and the key,
through xxh64 (never Python's process-randomised hash()), and changing it is a
format change for mixed-version groups. Members rank, best first, by

    (score, member id),   score = weight / -ln(u),   u = ((h >> 12) + 0.5) / 2**52,
    h = xxh64(key, seed=xxh64(member id)),

the standard weighted-HRW score, with u strictly inside (0, 1).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from xxhash import xxh64_intdigest

# The top 52 bits of h plus one half, over 2**52, are exact in a double and
# strictly inside (0, 1): ln(u) is then negative and finite, so no key ever
# gets an infinite or undefined score.
_U_SHIFT = 12
_U_SCALE = 1.0 / (1 << 52)


class Ring:
    """An immutable placement of keys over weighted members.

    A member's weight is its share of the keys, typically its cache size.
    Weight 0 keeps a member listed but owning nothing, which is how a member
    drains before it leaves. A membership change builds a new Ring, so a
    reader can keep the previous one to ask the owner from before a join.
    """

    def __init__(self, members: Mapping[str, float]):
        weights: dict[str, float] = {}
        for member, weight in members.items():
            weight = float(weight)
            # NaN or infinity would make one member win every key, or none.
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of member {member!r} must be finite and >= 0, not {weight!r}")
            weights[member] = weight
        self._weights = weights
        # Seeding xxh64 with the member id's hash scores a (member, key) pair
        # with one call and no concatenation, under which "ab" + "c" and
        # "a" + "bc" would collide.
        self._live = [(member, xxh64_intdigest(member.encode()), weight)
                      for member, weight in weights.items() if weight > 0]

    @property
    def members(self) -> dict[str, float]:
        """Member id -> weight, draining members included; a copy, since the ring is immutable."""
        return dict(self._weights)

    def owners(self, key: str, n: int = 1) -> list[str]:
        """Up to n distinct members with weight > 0, best first; [] if there are none.

        The first is the owner; the rest are where replicas of a hot block go,
        in the order to fall back to when the owner is down.
        """
        if n < 1 or not self._live:
            return []
        data, log = key.encode(), math.log
        # With u uniform, -ln(u) / weight is exponential of rate weight; the
        # smallest of them (the largest score) is member i's with probability
        # weight_i / sum(weights), so each member owns its weighted share.
        # Ties, vanishingly rare, go to the larger member id on every node.
        scored = [(weight / -log(((xxh64_intdigest(data, seed) >> _U_SHIFT) + 0.5) * _U_SCALE), member)
                  for member, seed, weight in self._live]
        return [member for _, member in heapq.nlargest(n, scored)]

    def owner(self, key: str) -> str | None:
        """The member that owns key, or None when no member has weight > 0."""
        best = self.owners(key, 1)
        return best[0] if best else None

    def __len__(self) -> int:
        """The number of members, draining ones included (as in `members`)."""
        return len(self._weights)

    def __eq__(self, other: object) -> bool:
        """Same members with the same weights, hence the same owners for every key."""
        if not isinstance(other, Ring):
            return NotImplemented
        return self._weights == other._weights

    def __repr__(self) -> str:
        return f"Ring({self._weights!r})"
