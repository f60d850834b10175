"""Object-store faults under a mount: with 10 % of S3 requests failing (500,
503 SlowDown, reset connections, truncated bodies, stalls), files written
with fsync all read back exactly after a cold remount, with no error seen by
the application."""
from __future__ import annotations

import os

import pytest

from faultproxy import KINDS, FaultProxy
from helpers import MiB, assert_ok, new_dir, run_cli, unique_bucket

pytestmark = pytest.mark.usefixtures("own_servers")



def test_ten_percent_of_s3_requests_fail(redis_server, s3_server, mounts):
    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), rate=0.0)
    try:
        url = redis_server.url(redis_server.new_db())
        bucket = f"http://127.0.0.1:{proxy.port}/{unique_bucket()}"
        assert_ok(run_cli("format", url, "faulty", "--storage", "s3", "--bucket", bucket, env=s3_server.env))
        mp, cache = new_dir("mnt"), new_dir("cache")
        m = mounts.start(["mount", url, str(mp), "--cache-dir", str(cache)], mp, s3_server.env, cache_dir=cache)
        proxy.rate = 0.10
        files = {f"f{i:02d}": os.urandom((i * 1_234_567) % (9 * MiB) + 1) for i in range(30)}
        for name, data in files.items():
            with open(mp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        m.remount(clear_cache=True)   # every block now comes from S3, through the faults
        for name, data in files.items():
            assert (mp / name).read_bytes() == data, name
        assert sum(proxy.faults.values()) >= 5, (proxy.requests, proxy.faults)
        assert set(proxy.faults) == set(KINDS), proxy.faults
    finally:
        proxy.close()
