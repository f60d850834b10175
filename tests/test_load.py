"""A short mixed load (tests/loadgen.py): 8 writer and 8 reader threads for
~12 s on one mount (creates in random pieces, fsyncs, renames into place and
over files, overwrites, O_APPEND appends, truncates, unlinks; whole, ranged
and mmap reads of finished files, every byte checked), then a cold remount
(empty cache dir: every block from S3) and a check of every file that
remains. No errors, no wrong byte, and the daemon's RSS stays within a
generous bound derived from its configured memory. bench/load.py is the
5-minute version.

JFSCACHE_LOAD_SECONDS=N runs the load longer.
"""
from __future__ import annotations

import os

import pytest

from helpers import MiB
from loadgen import LoadGen, format_result, read_rss

SECONDS = float(os.environ.get("JFSCACHE_LOAD_SECONDS", "12"))
MEM_CACHE_MIB = 128
BUFFER_MIB = 128


def rss_bound_mib(idle_mib: float) -> float:
    """What the daemon may hold: what it holds idle (interpreter, libraries,
    connection pools), its memory tier and write buffer, the disk tier's
    write-behind queue (64 MiB), blocks in flight for readers and prefetch
    (8 readers x (1 + --prefetch 8) x 4 MiB), all doubled for allocator
    slack and the Python heap's fragmentation."""
    in_flight = 8 * (1 + 8) * 4
    return idle_mib + 2 * (MEM_CACHE_MIB + BUFFER_MIB + 64 + in_flight)


@pytest.mark.usefixtures("own_servers")
def test_load_8_writers_8_readers_then_cold_verify(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol, None, "--mem-cache-size", f"{MEM_CACHE_MIB}M",
                     "--buffer-size", f"{BUFFER_MIB}M", "--cache-size", "2G")
    root = m.path / "load"
    root.mkdir()
    idle, _ = read_rss(m.pid)
    assert idle is not None
    lg = LoadGen(root, writers=8, readers=8, seconds=SECONDS, pid=m.pid, budget=256 * MiB)
    res = lg.run()
    report = format_result(res)
    print(f"\nidle RSS {idle:.0f} MiB\n{report}")
    assert not res["hung_threads"], report
    assert res["error_count"] == 0, report
    assert res["mismatch_count"] == 0, report
    assert res["ops"].get("create", {}).get("ops", 0) > 0 and res["ops"].get("read_whole"), report
    bound = rss_bound_mib(idle)
    assert res["peak_rss_mib"] is not None and res["peak_rss_mib"] < bound, \
        f"peak RSS {res['peak_rss_mib']} MiB over {bound:.0f} MiB\n{report}"

    m.remount(clear_cache=True)   # a clean unmount (flush), then every block from S3
    v = lg.verify_all()
    report = format_result(res, v)
    print(report)
    assert v["verified"] == v["files"] == res["files"], report
    assert not v["errors"], report
    assert not v["mismatches"], report
    assert not v["listing_problems"], report
