"""Counters of the data path: hits, misses and bytes per tier, object-store requests.

One process serves one mount, so module-level counters are enough. They are
shown by `jfscache stats MOUNTPOINT` (through the mount's .stats file).
"""
from __future__ import annotations

import json
from collections import defaultdict


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.c: dict[str, float] = defaultdict(float)

    def hit(self, tier: str, n: int):
        self.c[f"{tier}_hits"] += 1
        self.c[f"{tier}_hit_bytes"] += n

    def miss(self):
        self.c["misses"] += 1

    def observe_get(self, n: int, seconds: float):
        self.c["store_gets"] += 1
        self.c["store_get_bytes"] += n
        self.c["store_get_seconds"] += seconds

    def observe_put(self, n: int, seconds: float):
        self.c["store_puts"] += 1
        self.c["store_put_bytes"] += n
        self.c["store_put_seconds"] += seconds

    def prefetched(self):
        self.c["prefetched_blocks"] += 1

    def add(self, name: str, n: float = 1):
        self.c[name] += n

    def snapshot(self) -> dict:
        d = {k: (int(v) if float(v).is_integer() else round(v, 6)) for k, v in sorted(self.c.items())}
        for op in ("get", "put"):
            n = self.c.get(f"store_{op}s", 0)
            if n:
                d[f"store_{op}_avg_ms"] = round(1000 * self.c[f"store_{op}_seconds"] / n, 3)
        return d

    def json(self) -> bytes:
        return (json.dumps(self.snapshot(), indent=1) + "\n").encode()


STATS = Stats()
