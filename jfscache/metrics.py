"""The mount's metrics: one prometheus-client registry, shown three ways.

The daemon makes one Metrics and passes it to each component that counts
(BlockCache, DiskCache, Staging, VFS, fuse Operations, the cache group).
The registry is served over HTTP with `jfscache mount --metrics HOST:PORT`
(Prometheus text format), and rendered as JSON in MOUNTPOINT/.stats (the
flat key names `jfscache stats` and the tests have always read), which
`jfscache stats` and `jfscache profile` turn into live views.

Series (each with the prefix jfscache_; counters end in _total):

  FUSE
    jfscache_fuse_op_duration_seconds{op}       histogram of each FUSE operation (_count: operations)
    jfscache_fuse_read_bytes_total              bytes returned to readers
    jfscache_fuse_write_bytes_total             bytes written by applications
  block cache (tier: mem, disk, staging, group)
    jfscache_cache_hits_total{tier}             blocks (or parts of blocks) a tier served
    jfscache_cache_hit_bytes_total{tier}        bytes it served
    jfscache_cache_misses_total{tier}           lookups a tier could not serve
    jfscache_cache_local_misses_total           blocks no local tier held (fetched from the group or the store)
    jfscache_prefetched_blocks_total            blocks read ahead of sequential readers
    jfscache_memory_cache_bytes                 memory tier in use
    jfscache_memory_cache_limit_bytes           its size (--mem-cache-size)
    jfscache_disk_cache_bytes                   disk tier in use
    jfscache_disk_cache_limit_bytes             its size (--cache-size)
    jfscache_disk_writes_total                  blocks written to the disk tier
    jfscache_disk_write_bytes_total             their bytes
    jfscache_disk_write_errors_total            failed disk tier writes (disk full, read-only, ...)
    jfscache_disk_evictions_total               blocks evicted from the disk tier
    jfscache_disk_corrupt_blocks_total          cached blocks that failed verification (refetched)
    jfscache_disk_dropped_writes_total          blocks not cached because the write queue was full
  writes and staging
    jfscache_write_buffer_bytes                 bytes in write buffers
    jfscache_write_buffer_limit_bytes           their limit (--buffer-size)
    jfscache_staged_blocks_total                blocks staged on the cache disk instead of uploaded
    jfscache_staged_uploaded_blocks_total       staged blocks uploaded since
    jfscache_staging_pending_blocks             staged blocks waiting for upload
    jfscache_staging_pending_bytes              their bytes
  object store (kind: get, put, delete; each operation with its retries)
    jfscache_s3_requests_total{kind}            operations
    jfscache_s3_errors_total{kind}              failed ones (not found included)
    jfscache_s3_bytes_total{kind}               bytes moved
    jfscache_s3_request_duration_seconds{kind}  histogram of their duration
  cache group
    jfscache_group_members                      members in this node's ring
    jfscache_group_requests_total{peer}         requests to each peer
    jfscache_group_request_errors_total{peer}   failed ones (the read falls back to the store)
    jfscache_group_handover_hits_total          owned blocks found at a previous owner
    jfscache_group_served_requests_total        requests served to peers
    jfscache_group_served_bytes_total           block bytes sent to peers
    jfscache_group_served_connections_total     peer connections that authenticated
    jfscache_group_served_errors_total          errors answered or connections dropped
    jfscache_group_served_auth_failures_total   connections that failed authentication
  other
    jfscache_compactions_total                  chunks compacted
    jfscache_warmup_blocks_done                 blocks done by the running warmup jobs
    jfscache_warmup_blocks_total                blocks of the running warmup jobs
    jfscache_start_time_seconds                 when the mount started (unix time)
    jfscache_uptime_seconds                     seconds since then
"""
from __future__ import annotations

import json
import os
import math
import time
from bisect import bisect_left
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

TIERS = ("mem", "disk", "staging", "group")
S3_KINDS = ("get", "put", "delete")
FUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
S3_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SERVED = ("requests", "bytes", "connections", "errors", "auth_failures")  # the peer server's counters

# Plain counters, kept as attributes of Metrics (call sites do
# `metrics.disk_evictions += n`): attribute -> (series without _total, help).
COUNTERS = {
    "local_misses": ("jfscache_cache_local_misses",
                     "Blocks no local tier held: fetched from the cache group or the object store"),
    "prefetched": ("jfscache_prefetched_blocks", "Blocks read ahead of sequential readers"),
    "fuse_read_bytes": ("jfscache_fuse_read_bytes", "Bytes returned to readers"),
    "fuse_write_bytes": ("jfscache_fuse_write_bytes", "Bytes written by applications"),
    "disk_writes": ("jfscache_disk_writes", "Blocks written to the disk tier"),
    "disk_write_bytes": ("jfscache_disk_write_bytes", "Bytes written to the disk tier"),
    "disk_write_errors": ("jfscache_disk_write_errors", "Failed writes to the disk tier"),
    "disk_evictions": ("jfscache_disk_evictions", "Blocks evicted from the disk tier"),
    "disk_corrupt": ("jfscache_disk_corrupt_blocks", "Cached blocks that failed verification (dropped, refetched)"),
    "disk_dropped": ("jfscache_disk_dropped_writes", "Blocks not cached on disk because the write queue was full"),
    "staged": ("jfscache_staged_blocks", "Blocks staged on the cache disk instead of uploaded"),
    "staged_uploaded": ("jfscache_staged_uploaded_blocks", "Staged blocks uploaded since"),
    "group_handover_hits": ("jfscache_group_handover_hits", "Owned blocks found at a previous owner, not the store"),
    "served_requests": ("jfscache_group_served_requests", "Requests served to cache group peers"),
    "served_bytes": ("jfscache_group_served_bytes", "Block bytes sent to cache group peers"),
    "served_connections": ("jfscache_group_served_connections", "Peer connections that authenticated"),
    "served_errors": ("jfscache_group_served_errors", "Errors answered to peers, or connections dropped"),
    "served_auth_failures": ("jfscache_group_served_auth_failures", "Peer connections that failed authentication"),
    "compactions": ("jfscache_compactions", "Chunks compacted"),
}

# Gauges read from the components when scraped (see watch()).
GAUGES = {
    "memory_cache_bytes": "Bytes in the memory tier",
    "memory_cache_limit_bytes": "Size of the memory tier",
    "disk_cache_bytes": "Bytes in the disk tier",
    "disk_cache_limit_bytes": "Size of the disk tier",
    "write_buffer_bytes": "Bytes in write buffers",
    "write_buffer_limit_bytes": "Limit of the write buffers",
    "staging_pending_blocks": "Staged blocks waiting for upload",
    "staging_pending_bytes": "Bytes of staged blocks waiting for upload",
    "warmup_blocks_done": "Blocks done by the running warmup jobs",
    "warmup_blocks_total": "Blocks of the running warmup jobs",
}


class MetricsError(Exception):
    """The metrics endpoint cannot be served (one line, for the CLI)."""


class _Histogram:
    """Observations in fixed buckets; exported cumulatively, as Prometheus wants."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(self.bounds, x)] += 1
        self.sum += x

    def buckets(self) -> list[tuple[str, int]]:
        out, n = [], 0
        for bound, c in zip((*self.bounds, math.inf), self.counts):
            n += c
            out.append((floatToGoString(bound), n))
        return out


class _ServedSink:
    """The peer server's stats sink: group/peer.py calls add("peer_served_<what>", n)."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def add(self, name: str, n: float = 1) -> None:
        attr = "served_" + name.removeprefix("peer_served_")
        setattr(self.metrics, attr, getattr(self.metrics, attr) + n)


class Metrics:
    """The mount's counters as plain numbers (the data path only adds to
    them: prometheus-client's locked counters cost several times more per
    event), exported by collect() through one CollectorRegistry."""

    def __init__(self):
        self.start_time = time.time()
        for attr in COUNTERS:
            setattr(self, attr, 0)
        self.hits = dict.fromkeys(TIERS, 0)
        self.hit_bytes = dict.fromkeys(TIERS, 0)
        self.misses = dict.fromkeys(TIERS, 0)
        self.s3_requests = dict.fromkeys(S3_KINDS, 0)
        self.s3_errors = dict.fromkeys(S3_KINDS, 0)
        self.s3_bytes = dict.fromkeys(S3_KINDS, 0)
        self.s3_seconds = {k: _Histogram(S3_BUCKETS) for k in S3_KINDS}
        self.fuse_seconds: dict[str, _Histogram] = {}  # op -> its histogram
        self.group_members = 0
        self.group_requests: dict[str, int] = {}  # peer address -> requests
        self.group_errors: dict[str, int] = {}
        self.peer_served = _ServedSink(self)
        self._gauges: dict[str, Callable[[], float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- the data path ----------------------------------------------------
    def hit(self, tier: str, n: int) -> None:
        self.hits[tier] += 1
        self.hit_bytes[tier] += n

    def miss(self, tier: str) -> None:
        self.misses[tier] += 1

    def s3(self, kind: str, n: int, seconds: float) -> None:
        """One object-store operation that succeeded, moving n bytes."""
        self.s3_requests[kind] += 1
        self.s3_bytes[kind] += n
        self.s3_seconds[kind].observe(seconds)

    def s3_failed(self, kind: str, seconds: float) -> None:
        self.s3_requests[kind] += 1
        self.s3_errors[kind] += 1
        self.s3_seconds[kind].observe(seconds)

    def fuse_op(self, op: str, seconds: float) -> None:
        h = self.fuse_seconds.get(op)
        if h is None:
            h = self.fuse_seconds[op] = _Histogram(FUSE_BUCKETS)
        h.observe(seconds)

    def group_request(self, peer: str) -> None:
        self.group_requests[peer] = self.group_requests.get(peer, 0) + 1

    def group_error(self, peer: str) -> None:
        self.group_errors[peer] = self.group_errors.get(peer, 0) + 1

    # ---- gauges read when scraped -----------------------------------------
    def watch(self, *, mem=None, disk=None, budget=None, staging=None,
              warmups: Callable[[], list] | None = None) -> None:
        """Read buffer and tier use from the components when scraped:
        mem (MemoryCache), disk (DiskCache), budget (the VFS's WriteBudget),
        staging (Staging), warmups() (the fill.Progress of running jobs)."""
        g = self._gauges
        if mem is not None:
            g["memory_cache_bytes"] = lambda: mem.used
            g["memory_cache_limit_bytes"] = lambda: mem.capacity
        if disk is not None:
            g["disk_cache_bytes"] = lambda: disk.used
            g["disk_cache_limit_bytes"] = lambda: sum(d.capacity for d in disk.dirs)
        if budget is not None:
            g["write_buffer_bytes"] = lambda: budget.used
            g["write_buffer_limit_bytes"] = lambda: budget.limit
        if staging is not None:
            g["staging_pending_blocks"] = lambda: len(staging.pending)
            g["staging_pending_bytes"] = lambda: staging.bytes
        if warmups is not None:
            g["warmup_blocks_done"] = lambda: sum(p.done_blocks for p in warmups())
            g["warmup_blocks_total"] = lambda: sum(p.blocks for p in warmups())

    def _gauge(self, name: str) -> float:
        fn = self._gauges.get(name)
        try:
            return float(fn()) if fn is not None else 0.0
        except Exception:  # a scrape runs on the HTTP server's thread, while the daemon changes things
            return math.nan

    # ---- the registry's collector -----------------------------------------
    def collect(self):
        for attr, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(self, attr))
        for name, doc, values in (
                ("jfscache_cache_hits", "Blocks (or parts of blocks) served by a cache tier", self.hits),
                ("jfscache_cache_hit_bytes", "Bytes served by a cache tier", self.hit_bytes),
                ("jfscache_cache_misses", "Lookups a cache tier could not serve", self.misses)):
            yield _labeled(CounterMetricFamily(name, doc, labels=["tier"]), values)
        for name, doc, values in (
                ("jfscache_s3_requests", "Object-store operations (each with its retries)", self.s3_requests),
                ("jfscache_s3_errors", "Failed object-store operations", self.s3_errors),
                ("jfscache_s3_bytes", "Bytes moved to or from the object store", self.s3_bytes)):
            yield _labeled(CounterMetricFamily(name, doc, labels=["kind"]), values)
        yield _histograms(HistogramMetricFamily("jfscache_s3_request_duration_seconds",
                                                "Duration of object-store operations", labels=["kind"]),
                          self.s3_seconds)
        yield _histograms(HistogramMetricFamily("jfscache_fuse_op_duration_seconds", "Duration of FUSE operations",
                                                labels=["op"]), self.fuse_seconds)
        yield _labeled(CounterMetricFamily("jfscache_group_requests", "Requests to cache group peers",
                                           labels=["peer"]), self.group_requests)
        yield _labeled(CounterMetricFamily("jfscache_group_request_errors",
                                           "Failed requests to cache group peers (reads fall back to the store)",
                                           labels=["peer"]), self.group_errors)
        yield GaugeMetricFamily("jfscache_group_members", "Members in this node's cache group ring",
                                value=self.group_members)
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"jfscache_{name}", doc, value=self._gauge(name))
        yield GaugeMetricFamily("jfscache_start_time_seconds", "When the mount started (unix time)",
                                value=self.start_time)
        yield GaugeMetricFamily("jfscache_uptime_seconds", "Seconds since the mount started",
                                value=time.time() - self.start_time)

    # ---- the .stats snapshot ----------------------------------------------
    def samples(self) -> dict[str, dict[tuple, float]]:
        """Every sample of the registry: name -> {sorted label items: value}."""
        out: dict[str, dict[tuple, float]] = {}
        for family in self.registry.collect():
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def snapshot(self) -> dict:
        """The registry as the flat names .stats has always had (store_gets,
        mem_hits, group_members, peer_served_requests, ...), plus per FUSE op
        and per peer sections."""
        s = self.samples()

        def v(name: str, **labels) -> float:
            return s.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

        d: dict = {"pid": os.getpid()}  # the daemon's: `jfscache umount` waits for it to exit
        for t in TIERS:
            d[f"{t}_hits"] = v("jfscache_cache_hits_total", tier=t)
            d[f"{t}_hit_bytes"] = v("jfscache_cache_hit_bytes_total", tier=t)
            d[f"{t}_misses"] = v("jfscache_cache_misses_total", tier=t)
        d["misses"] = v("jfscache_cache_local_misses_total")
        d["prefetched_blocks"] = v("jfscache_prefetched_blocks_total")
        for k in S3_KINDS:
            errors = v("jfscache_s3_errors_total", kind=k)
            count = v("jfscache_s3_request_duration_seconds_count", kind=k)
            seconds = v("jfscache_s3_request_duration_seconds_sum", kind=k)
            d[f"store_{k}s"] = v("jfscache_s3_requests_total", kind=k) - errors  # those that succeeded
            d[f"store_{k}_errors"] = errors
            d[f"store_{k}_bytes"] = v("jfscache_s3_bytes_total", kind=k)
            d[f"store_{k}_seconds"] = seconds
            if count:
                d[f"store_{k}_avg_ms"] = 1000 * seconds / count
        for key, name in (("disk_writes", "disk_writes"), ("disk_write_bytes", "disk_write_bytes"),
                          ("disk_write_errors", "disk_write_errors"), ("disk_evictions", "disk_evictions"),
                          ("disk_corrupt", "disk_corrupt_blocks"), ("disk_add_dropped", "disk_dropped_writes"),
                          ("staged_blocks", "staged_blocks"), ("staged_uploaded_blocks", "staged_uploaded_blocks"),
                          ("group_handover_hits", "group_handover_hits"), ("compactions", "compactions"),
                          ("fuse_read_bytes", "fuse_read_bytes"), ("fuse_write_bytes", "fuse_write_bytes")):
            d[key] = v(f"jfscache_{name}_total")
        d["group_fallbacks"] = d["group_misses"]
        d["group_members"] = v("jfscache_group_members")
        peers: dict = {}
        for labels, n in s.get("jfscache_group_requests_total", {}).items():
            peers.setdefault(dict(labels)["peer"], {"requests": 0, "errors": 0})["requests"] = n
        for labels, n in s.get("jfscache_group_request_errors_total", {}).items():
            peers.setdefault(dict(labels)["peer"], {"requests": 0, "errors": 0})["errors"] = n
        d["group_errors"] = sum(p["errors"] for p in peers.values())
        d["group_peers"] = peers
        for w in SERVED:
            d[f"peer_served_{w}"] = v(f"jfscache_group_served_{w}_total")
        ops: dict = {}
        for labels, n in s.get("jfscache_fuse_op_duration_seconds_count", {}).items():
            op = dict(labels)["op"]
            ops[op] = {"count": n, "seconds": v("jfscache_fuse_op_duration_seconds_sum", op=op)}
        d["fuse_reads"] = ops.get("read", {}).get("count", 0)
        d["fuse_writes"] = ops.get("write", {}).get("count", 0)
        d["fuse_ops"] = dict(sorted(ops.items()))
        for name in ("memory_cache_bytes", "memory_cache_limit_bytes", "disk_cache_bytes", "disk_cache_limit_bytes",
                     "write_buffer_bytes", "write_buffer_limit_bytes", "staging_pending_blocks",
                     "staging_pending_bytes", "warmup_blocks_done", "warmup_blocks_total",
                     "start_time_seconds", "uptime_seconds"):
            d[name] = v(f"jfscache_{name}")
        return _tidy(d)

    def json(self) -> bytes:
        return (json.dumps(self.snapshot(), indent=1) + "\n").encode()

    # ---- the HTTP endpoint ------------------------------------------------
    def serve(self, listen: str):
        """Serve the registry at http://HOST:PORT/metrics on a daemon
        thread; returns the server (shutdown() and server_close() stop it)."""
        from prometheus_client import start_http_server
        host, port = split_listen(listen)
        try:
            server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {listen}: {e.strerror or e}") from None
        return server


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise MetricsError(f"--metrics must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _tidy(d):
    """Whole numbers as ints, others rounded, NaN (a gauge that could not be read) as None."""
    if isinstance(d, dict):
        return {k: _tidy(x) for k, x in d.items()}
    if isinstance(d, float):
        if math.isnan(d):
            return None
        return int(d) if d.is_integer() else round(d, 6)
    return d


def _labeled(family, values: dict):
    for label, n in dict(values).items():  # a copy: a scrape runs on another thread
        family.add_metric([label], n)
    return family


def _histograms(family, hists: dict):
    for label, h in dict(hists).items():
        family.add_metric([label], h.buckets(), h.sum)
    return family
