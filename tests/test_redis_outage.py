"""Redis failing under a mount. A restart in the middle of a write and read
workload is reconnected to without help and loses nothing fsync'd; an outage
fails operations with EIO after --meta-timeout, logs one line (no traceback
per operation), leaves the mount alive, and ends when Redis is back."""
from __future__ import annotations

import errno
import os
import time

import pytest

from helpers import FsyncWriter, RedisServer, assert_ok, new_dir, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("own_servers")



@pytest.fixture
def own_redis(tmp_dir):
    r = RedisServer(new_dir("redis-own"), persistent=True)
    r.start()
    yield r
    r.stop()


def _mount(own_redis, mounts, tmp_dir, *extra):
    url = own_redis.url(1)
    assert_ok(run_cli("format", url, "vol", "--storage", "file", "--bucket", tmp_dir / "store"))
    mp = new_dir("mnt")
    return mounts.start(["mount", url, str(mp), "--cache-dir", str(new_dir("cache")), *extra], mp, dict(os.environ))


def test_redis_restart_mid_workload(own_redis, mounts, tmp_dir):
    m = _mount(own_redis, mounts, tmp_dir)
    with FsyncWriter(m.path, verify=True) as w:
        w.wait_more(20)
        own_redis.restart()
        w.wait_more(20)
    written = w.written
    assert len(w.failed) <= 2, w.failed   # at most the operation(s) in flight at the restart
    for name, data in written.items():
        assert (m.path / name).read_bytes() == data, name
    m.remount(clear_cache=True)
    for name, data in written.items():
        assert (m.path / name).read_bytes() == data, name
    assert "Traceback" not in m.log_text()


def test_redis_outage_gives_eio_then_recovers(own_redis, mounts, tmp_dir):
    m = _mount(own_redis, mounts, tmp_dir, "--meta-timeout", "3")
    (m.path / "before").write_bytes(b"kept")
    own_redis.stop()
    for i in range(4):
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.stat(m.path / f"new{i}")   # a lookup: a Redis round trip
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 60, "an operation hung instead of failing"
    with pytest.raises(OSError) as e:
        (m.path / "during").write_bytes(b"x")
    assert e.value.errno == errno.EIO
    assert m.alive, "the daemon died in the outage"
    own_redis.start()
    wait_for(lambda: (m.path / "before").read_bytes() == b"kept", timeout=30, what="the mount to recover")
    (m.path / "after").write_bytes(b"works")
    assert (m.path / "after").read_bytes() == b"works"
    log = m.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("is unreachable") == 1, log[-3000:]
    assert "reachable again" in log


def test_an_idle_connection_that_redis_closed_is_not_used(own_redis):
    """A pooled connection that Redis closed while it sat idle (a restart,
    a client timeout, CLIENT KILL) is found closed before a request goes out
    on it: a non-idempotent command then goes out on a new connection and
    succeeds, instead of failing as "may or may not have been applied"."""
    import trio

    from jfscache.meta.redisio import Redis

    async def main():
        r = Redis(own_redis.url(3))
        try:
            await r.execute("SET", "counter", 1)
            cid = await r.execute("CLIENT", "ID")          # the one idle connection now
            own_redis.client(3).client_kill_filter(_id=cid)
            await trio.sleep(0.2)                          # its FIN arrives
            assert await r.execute("INCR", "counter") == 2
            assert await r.execute("CLIENT", "ID") != cid
        finally:
            await r.aclose()

    trio.run(main)


def test_read_many_packs_as_hiredis_does(own_redis):
    """Meta.getattrs packs its HMGETs once per listing batch with
    KeyedCommand: the bytes must be hiredis's, replies the same, and a
    command that writes is refused (read_many resends after a lost reply)."""
    import hiredis
    import trio

    from jfscache.meta import lua
    from jfscache.meta.redisio import KeyedCommand, Redis

    cmd = KeyedCommand("HMGET", *lua.ATTR_FIELDS)
    for key in (b"i1", b"i18446744073709551615", "ключ".encode()):
        assert cmd.pack(key) == hiredis.pack_command(("HMGET", key, *lua.ATTR_FIELDS))
    with pytest.raises(ValueError):
        KeyedCommand("HSET", "mode", "1")

    async def main():
        r = Redis(own_redis.url(4))
        try:
            await r.execute("HSET", "i7", "type", "f", "mode", "420")
            keys = [b"i7", b"i8"]
            assert await r.read_many(cmd, keys) == await r.pipeline([("HMGET", k, *lua.ATTR_FIELDS) for k in keys])
            assert await r.read_many(cmd, []) == []
        finally:
            await r.aclose()

    trio.run(main)
