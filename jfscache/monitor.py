"""`jfscache stats` and `jfscache profile`: terminal views (rich) of a
mount's .stats snapshots (jfscache/metrics.py), as `juicefs stats` and
`juicefs profile` show theirs. Rates come from two snapshots `seconds` apart.
"""
from __future__ import annotations

import json
import os

from rich.console import Group
from rich.table import Table

from .metrics import S3_KINDS, TIERS

MB = 1e6


def read_snapshot(mountpoint: str) -> dict:
    with open(os.path.join(mountpoint, ".stats"), "rb") as f:
        return json.loads(f.read())


def _rate(cur: dict, prev: dict, key: str, seconds: float) -> float:
    return (cur.get(key, 0) - prev.get(key, 0)) / seconds if seconds > 0 else 0.0


def _ratio(hits: float, misses: float) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ops(s: dict) -> int:
    return sum(v.get("count", 0) for v in s.get("fuse_ops", {}).values())


def stats_view(mountpoint: str, cur: dict, prev: dict, seconds: float):
    """Rates between two snapshots (prev may be {}: then since the mount
    started, `seconds` its uptime), and the counters since the mount."""
    def rate(key):
        return _rate(cur, prev, key, seconds)

    head = (f"[bold]{mountpoint}[/]  up {cur.get('uptime_seconds', 0):.0f} s, "
            f"rates over the last {seconds:.1f} s")
    fuse = Table(title="FUSE", title_justify="left", expand=False)
    for c in ("read MB/s", "write MB/s", "ops/s", "read total", "written total", "ops total"):
        fuse.add_column(c, justify="right")
    ops_rate = (_ops(cur) - _ops(prev)) / seconds if seconds > 0 else 0.0
    fuse.add_row(f"{rate('fuse_read_bytes') / MB:.1f}", f"{rate('fuse_write_bytes') / MB:.1f}", f"{ops_rate:.0f}",
                 _size(cur.get("fuse_read_bytes", 0)), _size(cur.get("fuse_write_bytes", 0)), str(_ops(cur)))

    cache = Table(title="cache tiers", title_justify="left")
    cache.add_column("tier")
    for c in ("hits/s", "MB/s", "misses/s", "hit ratio", "hit ratio (since mount)", "in use"):
        cache.add_column(c, justify="right")
    in_use = {"mem": (cur.get("memory_cache_bytes"), cur.get("memory_cache_limit_bytes")),
              "disk": (cur.get("disk_cache_bytes"), cur.get("disk_cache_limit_bytes")),
              "staging": (cur.get("staging_pending_bytes"), None)}
    for t in TIERS:
        h, m = f"{t}_hits", f"{t}_misses"
        used, limit = in_use.get(t, (None, None))
        use = "" if used is None else _size(used) + (f" / {_size(limit)}" if limit else "")
        cache.add_row(t, f"{rate(h):.1f}", f"{rate(f'{t}_hit_bytes') / MB:.1f}", f"{rate(m):.1f}",
                      _ratio(cur.get(h, 0) - prev.get(h, 0), cur.get(m, 0) - prev.get(m, 0)),
                      _ratio(cur.get(h, 0), cur.get(m, 0)), use)

    s3 = Table(title="object store", title_justify="left")
    s3.add_column("kind")
    for c in ("ops/s", "MB/s", "errors/s", "avg ms", "ops total", "errors total"):
        s3.add_column(c, justify="right")
    for k in S3_KINDS:
        n = cur.get(f"store_{k}s", 0) + cur.get(f"store_{k}_errors", 0)
        dn = n - prev.get(f"store_{k}s", 0) - prev.get(f"store_{k}_errors", 0)
        dsec = cur.get(f"store_{k}_seconds", 0) - prev.get(f"store_{k}_seconds", 0)
        s3.add_row(k, f"{dn / seconds if seconds > 0 else 0:.1f}", f"{rate(f'store_{k}_bytes') / MB:.1f}",
                   f"{rate(f'store_{k}_errors'):.1f}", f"{1000 * dsec / dn:.1f}" if dn else "-",
                   str(n), str(cur.get(f"store_{k}_errors", 0)))

    group = Table(title=f"cache group: {cur.get('group_members', 0)} members", title_justify="left")
    group.add_column("")
    for c in ("requests/s", "MB/s", "errors/s", "requests total"):
        group.add_column(c, justify="right")
    group.add_row("fetched from peers", f"{rate('group_hits'):.1f}", f"{rate('group_hit_bytes') / MB:.1f}",
                  f"{rate('group_errors'):.1f}", str(cur.get("group_hits", 0)))
    group.add_row("served to peers", f"{rate('peer_served_requests'):.1f}",
                  f"{rate('peer_served_bytes') / MB:.1f}", f"{rate('peer_served_errors'):.1f}",
                  str(cur.get("peer_served_requests", 0)))
    prev_peers = prev.get("group_peers", {})
    for peer, p in sorted(cur.get("group_peers", {}).items()):
        q = prev_peers.get(peer, {})
        group.add_row(f"  peer {peer}",
                      f"{(p['requests'] - q.get('requests', 0)) / seconds if seconds > 0 else 0:.1f}", "",
                      f"{(p['errors'] - q.get('errors', 0)) / seconds if seconds > 0 else 0:.1f}",
                      str(p["requests"]))

    buffers = (f"write buffer {_size(cur.get('write_buffer_bytes') or 0)} / "
               f"{_size(cur.get('write_buffer_limit_bytes') or 0)}   "
               f"staged for upload: {cur.get('staging_pending_blocks') or 0} blocks "
               f"({_size(cur.get('staging_pending_bytes') or 0)})   "
               f"prefetched blocks/s {rate('prefetched_blocks'):.1f}")
    if cur.get("warmup_blocks_total"):
        buffers += f"   warmup {cur.get('warmup_blocks_done', 0)}/{cur['warmup_blocks_total']} blocks"
    return Group(head, fuse, cache, s3, group, buffers)


def profile_view(mountpoint: str, cur: dict, base: dict, seconds: float, top: int = 30):
    """FUSE operations between two snapshots (base may be {}: since the
    mount started), the slowest in total first."""
    base_ops = base.get("fuse_ops", {})
    rows = []
    for op, v in cur.get("fuse_ops", {}).items():
        b = base_ops.get(op, {})
        n, t = v["count"] - b.get("count", 0), v["seconds"] - b.get("seconds", 0)
        if n > 0:
            rows.append((op, n, t))
    total = sum(t for _, _, t in rows)
    rows.sort(key=lambda r: (-r[2], -r[1]))
    head = f"[bold]{mountpoint}[/]  FUSE operations over {seconds:.1f} s, the most total time first"
    table = Table()
    table.add_column("op")
    for c in ("calls", "calls/s", "total s", "mean ms", "% of time"):
        table.add_column(c, justify="right")
    for op, n, t in rows[:top]:
        table.add_row(op, str(n), f"{n / seconds if seconds > 0 else 0:.1f}", f"{t:.3f}", f"{1000 * t / n:.3f}",
                      f"{100 * t / total:.1f}" if total else "-")
    if not rows:
        table.add_row("(no operations)", "", "", "", "", "")
    return Group(head, table)
