"""Blocks the object store does not take are staged on the cache disk and
uploaded later; with --writeback every block is. Shown through a mount in
front of a fault-injecting proxy: an fsync'd file survives a store outage, a
SIGKILL of the daemon with uploads pending, and is read by another node once
it lands; a full staging disk falls back to synchronous uploads; a read
during an outage fails with EIO after --io-timeout instead of hanging."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import threading

import pytest

from faultproxy import FaultProxy
from helpers import MiB, assert_ok, new_dir, run_cli, unique_bucket, wait_for

pytestmark = pytest.mark.usefixtures("own_servers")



@pytest.fixture
def proxied(redis_server, s3_server):
    """(meta URL, proxy): a volume whose S3 traffic goes through a FaultProxy."""
    proxy = FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), rate=0.0)
    proxy.kinds = ("500",)
    url = redis_server.url(redis_server.new_db())
    bucket = f"http://127.0.0.1:{proxy.port}/{unique_bucket()}"
    assert_ok(run_cli("format", url, "staged", "--storage", "s3", "--bucket", bucket, env=s3_server.env))
    yield url, proxy
    proxy.close()


def _outage(proxy: FaultProxy, methods=None) -> None:
    proxy.methods = methods
    proxy.rate = 1.0


def _restore(proxy: FaultProxy) -> None:
    proxy.rate = 0.0


def _staged(url: str, env: dict) -> int:
    """Blocks waiting for upload, over all nodes, as `jfscache status` shows them."""
    r = assert_ok(run_cli("status", url, env=env))
    return sum(p["blocks"] for p in json.loads(r.stdout)["pending_uploads"].values())


def _stats(mp) -> dict:
    return json.loads((mp / ".stats").read_bytes())


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_outage_stages_blocks_and_uploads_them_later(proxied, s3_server, mounts):
    url, proxy = proxied
    env = s3_server.env
    mp, cache = new_dir("mnt"), new_dir("cache")
    m = mounts.start(["mount", url, str(mp), "--cache-dir", str(cache), "--io-retries", "1",
                      "--io-timeout", "2"], mp, env, cache_dir=cache)
    before = {"old": os.urandom(5 * MiB)}
    _write(mp / "old", before["old"])
    m.remount(clear_cache=True)

    _outage(proxy)
    # A read of a block no tier has fails with EIO after --io-timeout.
    with pytest.raises(OSError) as e:
        (mp / "old").read_bytes()
    assert e.value.errno == errno.EIO

    # Writes succeed: their blocks wait on the cache disk, fsync'd.
    files = {f"f{i}": os.urandom(n) for i, n in enumerate((9 * MiB + 5, 70_000, 1))}
    for name, data in files.items():
        _write(mp / name, data)
    wait_for(lambda: _staged(url, env) >= 5, what="status to show the 5 staged blocks")  # 3 of f0, 1 each
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name  # served here meanwhile
    assert "staged block" in m.log_text()

    _restore(proxy)
    wait_for(lambda: _staged(url, env) == 0, timeout=60, what="the staged blocks to be uploaded")
    m.remount(clear_cache=True)  # cold: everything from S3
    for name, data in {**files, **before}.items():
        assert (mp / name).read_bytes() == data, name
    assert _stats(mp)["store_gets"] >= 5


def test_writeback_survives_a_crash_and_another_node_waits_for_the_upload(proxied, s3_server, mounts):
    url, proxy = proxied
    env = s3_server.env
    mp, cache = new_dir("mnt"), new_dir("cache")
    m = mounts.start(["mount", url, str(mp), "--cache-dir", str(cache), "--writeback",
                      "--io-timeout", "5"], mp, env, cache_dir=cache)
    mp2, cache2 = new_dir("mnt2"), new_dir("cache2")
    mounts.start(["mount", url, str(mp2), "--cache-dir", str(cache2), "--io-timeout", "120"], mp2, env,
                 cache_dir=cache2)

    _outage(proxy, methods={b"PUT"})  # the store serves reads, takes no writes
    files = {f"d{i}": os.urandom(n) for i, n in enumerate((6 * MiB, 64 << 10, 300_001))}
    for name, data in files.items():
        _write(mp / name, data)   # returns once staged and committed
    assert _stats(mp)["staged_blocks"] >= 4
    wait_for(lambda: _staged(url, env) >= 4, what="status to show the staged blocks")

    # The other node sees the files at once, and its read waits for the data.
    got: dict[str, bytes | Exception] = {}

    def read_on_other_node():
        try:
            got["d0"] = (mp2 / "d0").read_bytes()
        except OSError as e:
            got["d0"] = e

    reader = threading.Thread(target=read_on_other_node)
    reader.start()

    m.kill()   # SIGKILL with every upload pending
    staged = list((cache / "staging").glob("seg-*"))
    assert staged, "staged blocks must survive the crash"
    for p in staged:   # data of other users: private, like the cache
        assert oct(p.stat().st_mode & 0o777) == "0o600" and oct(p.parent.stat().st_mode & 0o777) == "0o700", p
    assert reader.is_alive(), got   # still waiting for the blocks
    r = run_cli("fsck", url, env=env)   # says where the "missing" blocks wait
    assert r.returncode == 1 and "not uploaded yet" in r.stdout, r.stdout + r.stderr

    _restore(proxy)
    m.start()   # the next mount with this cache dir uploads what was staged
    wait_for(lambda: _staged(url, env) == 0, timeout=60, what="the staged blocks to be uploaded")
    reader.join(120)
    assert got["d0"] == files["d0"]
    m.remount(clear_cache=True)
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name
        assert (mp2 / name).read_bytes() == data, name


@pytest.fixture
def small_disk():
    """A 24 MiB tmpfs as the cache disk."""
    d = new_dir("smalldisk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_writeback_falls_back_to_synchronous_uploads_when_staging_is_full(proxied, s3_server, mounts,
                                                                          small_disk):
    url, _ = proxied
    env = s3_server.env
    mp = new_dir("mnt")
    cache = small_disk / "cache"
    cache.mkdir()
    m = mounts.start(["mount", url, str(mp), "--cache-dir", str(cache), "--writeback", "--cache-size", "1M",
                      "--free-space-ratio", "0.1"], mp, env, cache_dir=cache)
    # Fill the disk until a 64 KiB block still fits above the 10 % reserve, a 4 MiB one does not.
    st = os.statvfs(small_disk)
    room = st.f_bavail * st.f_frsize - int(0.1 * st.f_blocks * st.f_frsize)
    (small_disk / "filler").write_bytes(b"\0" * (room - 2 * MiB))
    big, small = os.urandom(12 * MiB), os.urandom(64 << 10)
    _write(mp / "small", small)  # staged
    _write(mp / "big", big)      # no room to stage: uploaded synchronously
    st = _stats(mp)
    assert st.get("staged_blocks", 0) >= 1 and st["store_puts"] >= 3, st
    assert "cannot stage block" in m.log_text()
    wait_for(lambda: _staged(url, env) == 0, timeout=60, what="the staged blocks to be uploaded")
    (small_disk / "filler").unlink()
    m.remount(clear_cache=True)
    assert (mp / "big").read_bytes() == big
    assert (mp / "small").read_bytes() == small


def test_writeback_needs_a_cache_dir(proxied, s3_server, tmp_dir):
    url, _ = proxied
    mp = new_dir("mnt")
    r = run_cli("mount", url, str(mp), "--writeback", "--cache-size", "0", env=s3_server.env)
    assert r.returncode != 0 and "--writeback needs a usable cache dir" in r.stderr, r.stderr


# ---- the segment format, without a mount -----------------------------------

class _Store:
    """Takes puts unless `down`."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.down = False

    async def put(self, key, data):
        from jfscache.storage import Unreachable
        if self.down:
            raise Unreachable("down")
        self.objects[key] = bytes(data)


def _run_staging(root, store, body):
    import trio

    from jfscache.cache.staging import Staging

    async def main():
        st = Staging(str(root), "vol", store)
        await st.open()
        async with trio.open_nursery() as n:
            st.start(n)
            try:
                return await body(st)
            finally:
                n.cancel_scope.cancel()
    return trio.run(main)


def _wait_uploaded(st):
    import trio

    async def wait():
        with trio.fail_after(10):
            while st.pending:
                await trio.sleep(0.01)
    return wait()


def test_staging_segments_survive_restarts_torn_records_and_reuse(tmp_path):
    """Staged blocks are found again after a restart (a "crash": nothing
    closed), a torn record hides neither the records after it nor is it
    uploaded, uploaded records are not uploaded again, and a reused segment's
    older records are told apart by their generation."""
    from jfscache.cache import staging as stg

    store = _Store()
    store.down = True
    blocks = {f"vol/chunks/0/0/{i}_0_{n}": os.urandom(n) for i, n in enumerate((1, 70_000, 4 * MiB, 5000, 65536))}

    async def stage_all(st):
        for k, v in blocks.items():
            assert await st.stage(k, memoryview(v))
        for k, v in blocks.items():
            assert await st.get(k) == v  # served from staging
        assert st.bytes == sum(map(len, blocks.values()))
    _run_staging(tmp_path, store, stage_all)
    segs = list((tmp_path / "staging").glob("seg-*"))
    assert len(segs) == 1 and oct(segs[0].stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "staging").stat().st_mode & 0o777) == "0o700"

    # Tear the second record (a write the crash cut short, never acknowledged).
    raw = bytearray(segs[0].read_bytes())
    torn = raw.index(b"vol/chunks/0/0/1_0_70000")
    raw[torn + 100:torn + 200] = os.urandom(100)
    segs[0].write_bytes(raw)
    del blocks["vol/chunks/0/0/1_0_70000"]

    store.down = False

    async def upload(st):
        assert set(st.pending) == set(blocks)
        await _wait_uploaded(st)
    _run_staging(tmp_path, store, upload)
    assert store.objects == blocks

    # Uploaded records are marked: a restart finds nothing to do. The drained
    # segment is reused from its front, one generation up; a restart then
    # sees only the new record, not the older ones behind it.
    store.objects.clear()
    store.down = True

    async def reuse(st):
        assert not st.pending
        assert await st.stage("vol/chunks/0/0/7_0_3", b"new")
    _run_staging(tmp_path, store, reuse)
    records = stg._scan_segment(os.open(segs[0], os.O_RDONLY))
    assert {r[0] for r in records} == {1, 2} and len(records) > 2

    async def after(st):
        assert list(st.pending) == ["vol/chunks/0/0/7_0_3"]
        assert await st.get("vol/chunks/0/0/7_0_3") == b"new"
    _run_staging(tmp_path, store, after)


def test_staging_leaves_another_volumes_blocks_to_that_volume(tmp_path):
    from jfscache.cache.staging import Staging
    import trio

    store = _Store()
    store.down = True

    async def stage(st):
        assert await st.stage("othervol/chunks/0/0/9_0_10", b"x" * 10)
    _run_staging(tmp_path, store, stage)
    store.down = False
    _run_staging(tmp_path, store, _wait_uploaded)  # as volume "vol": nothing to upload
    assert not store.objects

    async def as_other():
        st = Staging(str(tmp_path), "othervol", store)
        await st.open()
        async with trio.open_nursery() as n:
            st.start(n)
            await _wait_uploaded(st)
            n.cancel_scope.cancel()
    trio.run(as_other)
    assert store.objects == {"othervol/chunks/0/0/9_0_10": b"x" * 10}


def test_staging_uploads_blocks_staged_as_files_before_segments(tmp_path):
    """A block staged by the earlier layout (a file per block, its xxh64
    appended) is uploaded and removed; a damaged one is not uploaded."""
    import xxhash

    root = tmp_path / "staging"
    root.mkdir(mode=0o700)
    good, bad = os.urandom(3000), os.urandom(4000)
    (root / "vol,chunks,0,0,1_0_3000").write_bytes(good + xxhash.xxh64_intdigest(good).to_bytes(8, "big"))
    (root / "vol,chunks,0,0,2_0_4000").write_bytes(bad + (xxhash.xxh64_intdigest(bad) ^ 1).to_bytes(8, "big"))
    store = _Store()

    async def body(st):
        assert await st.get("vol/chunks/0/0/1_0_3000") == good
        await _wait_uploaded(st)
    _run_staging(tmp_path, store, body)
    assert store.objects == {"vol/chunks/0/0/1_0_3000": good}
    assert not (root / "vol,chunks,0,0,1_0_3000").exists()


def test_upload_delay_holds_staged_blocks_back_except_at_unmount(tmp_path):
    """--upload-delay: a staged block is uploaded once it is that old; the
    drain at unmount uploads at once."""
    import trio

    from jfscache.cache.staging import Staging

    store = _Store()

    async def main():
        st = Staging(str(tmp_path), "vol", store, upload_delay=0.6)
        await st.open()
        async with trio.open_nursery() as n:
            st.start(n)
            assert await st.stage("vol/chunks/0/0/1_0_1", b"a")
            await trio.sleep(0.3)
            assert not store.objects   # not old enough yet
            with trio.fail_after(5):
                while st.pending:
                    await trio.sleep(0.05)
            assert list(store.objects) == ["vol/chunks/0/0/1_0_1"]
            assert await st.stage("vol/chunks/0/0/2_0_1", b"b")
            with trio.fail_after(0.5):   # well before the delay
                await st.drain(stall=5)
            assert "vol/chunks/0/0/2_0_1" in store.objects
            n.cancel_scope.cancel()
    trio.run(main)


def test_writeback_holds_uploads_while_a_burst_goes_on(tmp_path, monkeypatch):
    """With a hold (--writeback), blocks staged one after another wait while
    the burst goes on, and are uploaded once it pauses for QUIET; a steady
    stream uploads each block once it has waited `hold`; the drain at unmount
    uploads at once. An upload takes the block's bytes from `source` (the
    memory tier) when it has them, instead of reading them back."""
    import trio

    from jfscache.cache import staging as stg

    monkeypatch.setattr(stg, "QUIET", 0.5)  # wide margins: the test machine is slow at times
    store = _Store()
    in_memory = {}

    async def main():
        st = stg.Staging(str(tmp_path), "vol", store, hold=2.0, source=in_memory.get)
        await st.open()
        async with trio.open_nursery() as n:
            st.start(n)
            for i in range(10):  # a burst: a block every 0.02 s
                assert await st.stage(f"vol/chunks/0/0/{i}_0_1", b"a")
                await trio.sleep(0.02)
            assert not store.objects
            with trio.fail_after(5):
                while st.pending:
                    await trio.sleep(0.01)
            assert len(store.objects) == 10

            # A stream that never pauses: blocks go once the oldest waited
            # `hold`. (Wait for that block itself: after a stall of the
            # machine several may be due at once, and another may land first.)
            i = 10
            with trio.fail_after(20):
                while "vol/chunks/0/0/10_0_1" not in store.objects:
                    assert await st.stage(f"vol/chunks/0/0/{i}_0_1", b"b")
                    i += 1
                    await trio.sleep(0.05)
            assert store.objects["vol/chunks/0/0/10_0_1"] == b"b" and i > 10 + 10

            # The drain does not wait for the hold; a block in memory is
            # uploaded from there (its staged record says "c").
            with trio.fail_after(20):
                while st.pending:
                    await trio.sleep(0.01)
            monkeypatch.setattr(stg, "QUIET", 3600)
            st.hold = 3600
            in_memory["vol/chunks/0/0/99_0_1"] = b"m"
            assert await st.stage("vol/chunks/0/0/99_0_1", b"c")
            with trio.fail_after(10):
                await st.drain(stall=5)
            assert not st.pending and store.objects["vol/chunks/0/0/99_0_1"] == b"m"
            n.cancel_scope.cancel()
    trio.run(main)
