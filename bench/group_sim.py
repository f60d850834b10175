"""Cache-group placement past one machine, by simulation.

    .venv/bin/python -m bench.group_sim [--keys 200000] [--out bench/GROUP_SIM.md]

Drives the real placement code (jfscache.group.ring.Ring) with 100 members
and 1,000 clients, pure computation with no network, to show what loopback
tests cannot: (a) how evenly block keys spread, (b) with mixed weights, (c)
how much of one hot file's traffic lands on one member with 1, 2 or 3
replicas, (d) how many keys move on scale events against the ideal, and (e)
what owners() costs per call. Everything but the timings in (e) is
deterministic. Prints a markdown report; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import xxhash

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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=200_000, help="block keys for balance and movement")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    args = ap.parse_args()
    command = "python -m bench.group_sim" + (f" --keys {args.keys}" if args.keys != 200_000 else "") + \
        (f" --out {args.out}" if args.out else "")
    keys = block_keys(args.keys)
    lines = ["# Cache-group placement, simulated: 100 members, 1,000 clients",
             f"Produced by `{command}` from the repo root on {dt.date.today()}: Python {platform.python_version()}, "
             f"xxhash {xxhash.VERSION}, {cpu_model()} ({os.cpu_count()} CPUs, shared with other work).",
             "Pure computation over the real `jfscache.group.ring.Ring`, no network; "
             "all figures but the timings in (e) are deterministic.", ""]
    sections = [("balance", lambda: balance(keys)), ("weighted balance", lambda: weighted_balance(keys)),
                ("hot spot", hot_spot), ("movement", lambda: movement(keys)), ("cost", cost)]
    for name, run in sections:
        start = time.perf_counter()
        lines += run() + [""]
        # Progress on stderr, so stdout stays the report alone.
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
