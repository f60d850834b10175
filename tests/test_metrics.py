"""Metrics through a real mount: the Prometheus endpoint (--metrics), the
live views `jfscache stats` and `jfscache profile`, and the Grafana
dashboard in systemd/ against what the endpoint exports."""
import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import helpers
import jfscache.metrics
from helpers import MountManager, assert_clean_error, assert_ok, free_port, new_dir, run_cli, wait_for

MiB = 1 << 20
DASHBOARD = Path(__file__).resolve().parent.parent / "systemd" / "grafana-dashboard.json"
# The series jfscache/metrics.py documents (its module docstring lists them all).
DOCUMENTED = sorted(set(re.findall(r"\bjfscache_[a-z0-9_]+", jfscache.metrics.__doc__)))


class Scrape:
    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
            self.text = r.read().decode()
        # Series names as declared: counters with _total, histograms without _bucket/_sum/_count.
        self.declared = set(re.findall(r"^# TYPE (\S+) ", self.text, re.M))
        self.samples: dict[tuple, float] = {}
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.names = self.declared | {name for name, _ in self.samples}

    def __call__(self, name: str, **labels) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics_mount(redis_server, s3_server):
    """One mount of an S3 volume with --metrics for the module: (Mount, port)."""
    port = free_port()
    mgr = MountManager()
    try:
        yield mgr.mount(helpers.make_volume(redis_server, s3_server, "s3"), None,
                        "--metrics", f"127.0.0.1:{port}"), port
    finally:
        mgr.cleanup()


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the next read reaches the mount again
    return data


def test_endpoint_counts_misses_then_hits(metrics_mount):
    m, port = metrics_mount
    data = os.urandom(6 * MiB)  # two blocks
    (m.path / "f").write_bytes(data)
    assert Scrape(port)("jfscache_s3_requests_total", kind="put") >= 2
    m.remount(clear_cache=True)  # the same --metrics port again, an empty cache

    s0 = Scrape(port)
    assert _read(m.path / "f") == data
    s1 = Scrape(port)
    assert _read(m.path / "f") == data
    s2 = Scrape(port)

    # The cold read missed every local tier and fetched both blocks from S3 ...
    assert s1("jfscache_cache_local_misses_total") - s0("jfscache_cache_local_misses_total") >= 2
    assert s1("jfscache_cache_misses_total", tier="mem") > s0("jfscache_cache_misses_total", tier="mem")
    assert s1("jfscache_cache_misses_total", tier="disk") > s0("jfscache_cache_misses_total", tier="disk")
    gets = s1("jfscache_s3_requests_total", kind="get")
    assert gets - s0("jfscache_s3_requests_total", kind="get") >= 2
    assert s1("jfscache_s3_bytes_total", kind="get") >= len(data)
    assert s1("jfscache_s3_request_duration_seconds_count", kind="get") >= 2
    # ... and the second was served by the memory tier, with no S3 request.
    assert s2("jfscache_cache_hits_total", tier="mem") > s1("jfscache_cache_hits_total", tier="mem")
    assert s2("jfscache_cache_hit_bytes_total", tier="mem") > s1("jfscache_cache_hit_bytes_total", tier="mem")
    assert s2("jfscache_s3_requests_total", kind="get") == gets
    assert s2("jfscache_fuse_read_bytes_total") >= 2 * len(data)
    assert s2("jfscache_fuse_op_duration_seconds_count", op="read") > s0("jfscache_fuse_op_duration_seconds_count",
                                                                         op="read")
    assert s2("jfscache_memory_cache_bytes") >= len(data)
    assert s2("jfscache_memory_cache_limit_bytes") == 256 * MiB
    assert s2("jfscache_uptime_seconds") > 0
    # The blocks reach the disk tier behind the reads.
    wait_for(lambda: Scrape(port)("jfscache_disk_writes_total") >= 2, what="the blocks on the disk tier")

    assert len(DOCUMENTED) >= 40
    missing = [n for n in DOCUMENTED if n not in s2.declared]
    assert not missing, f"documented but not exported: {missing}"
    undocumented = sorted(n for n in s2.declared if n not in DOCUMENTED)
    assert not undocumented, f"exported but not documented in jfscache/metrics.py: {undocumented}"

    # .stats is the same registry under its old names.
    st = json.loads((m.path / ".stats").read_bytes())
    s3 = Scrape(port)
    assert st["store_gets"] == s3("jfscache_s3_requests_total", kind="get") - s3("jfscache_s3_errors_total", kind="get")
    assert st["mem_hits"] == s3("jfscache_cache_hits_total", tier="mem")
    assert st["misses"] == s3("jfscache_cache_local_misses_total")
    assert st["fuse_read_bytes"] >= 2 * len(data) and st["group_members"] == 0
    assert st["fuse_ops"]["read"]["count"] >= 2


def test_metrics_port_in_use_or_malformed_is_one_line(metrics_mount, tmp_dir):
    vol = metrics_mount[0].volume
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("mount", vol.meta_url, new_dir("mnt"), "--cache-dir", tmp_dir / "cache",
                    "--metrics", f"127.0.0.1:{port}", env=vol.env)
    assert_clean_error(r, rf"cannot serve metrics on 127\.0\.0\.1:{port}: .*in use")
    r = run_cli("mount", vol.meta_url, new_dir("mnt"), "--metrics", "9567", env=vol.env)
    assert_clean_error(r, "--metrics must be HOST:PORT")


def test_stats_and_profile_views(metrics_mount):
    m, port = metrics_mount
    (m.path / "d").mkdir()
    for i in range(5):
        (m.path / "d" / f"f{i}").write_bytes(os.urandom(100_000))
    assert len(os.listdir(m.path / "d")) == 5
    assert _read(m.path / "d" / "f0")

    out = assert_ok(run_cli("stats", m.path, "--once", "--interval", "0.2")).stdout
    for word in ("FUSE", "read MB/s", "write MB/s", "ops/s", "cache tiers", "hit ratio", "object store",
                 "cache group", "write buffer"):
        assert word in out, (word, out)
    for tier in jfscache.metrics.TIERS + jfscache.metrics.S3_KINDS:
        assert re.search(rf"^\W*{tier}\b", out, re.M), (tier, out)

    out = assert_ok(run_cli("profile", m.path, "--once")).stdout
    for op in ("write", "create", "mkdir", "lookup", "read", "readdir"):
        assert re.search(rf"^\W*{op}\b", out, re.M), (op, out)
    assert "mean ms" in out and "calls" in out

    # Scripts: --json, and the old default when stdout is not a terminal, print the counters.
    for args in (["--json"], []):
        st = json.loads(assert_ok(run_cli("stats", m.path, *args)).stdout)
        assert st["fuse_write_bytes"] >= 500_000 and "store_puts" in st and "fuse_ops" in st
    assert_clean_error(run_cli("stats", m.path / "d"), r"is .* a jfscache mount")


def test_dashboard_uses_exported_series(metrics_mount):
    m, port = metrics_mount
    (m.path / "small").write_bytes(b"x" * 1000)  # FUSE ops, so the per-op histogram has samples
    exported = Scrape(port).names
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(dash)
    used = {name for e in exprs for name in re.findall(r"\bjfscache_[a-z0-9_]+", e)}
    assert len(used) >= 30, used
    assert not used - exported, f"the dashboard uses series the endpoint does not export: {used - exported}"
