"""Cache groups through real mounts: several daemons of one S3 volume on
loopback, each with its own cache dir and peer port. Blocks come from their
owner, S3 serves each block once for the whole group, a dead or drained
member costs no failed read, and peers must know the group secret."""
from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import trio

from helpers import MiB, assert_ok, free_port, new_dir, run_cli, wait_for
from jfscache.group.peer import PeerClient, PeerError

pytestmark = pytest.mark.usefixtures("own_servers")



def stats(m) -> dict:
    with open(m.path / ".stats") as f:
        return json.load(f)


def total(mounts, name: str) -> int:
    return sum(stats(m).get(name, 0) for m in mounts)


def member(mount_volume, vol, *extra, group="g", port=None, timeout=5):
    """A member on a free loopback port. The heartbeat timeout stays at the
    default (5 s): shorter ones let a busy CI machine drop members mid-test."""
    port = port or free_port()
    m = mount_volume(vol, None, "--cache-group", group, "--group-listen", f"127.0.0.1:{port}",
                     "--group-timeout", str(timeout), *extra)
    m.port = port
    return m


_KEYS = ("group_members", "group_hits", "group_misses", "group_errors", "group_fallbacks",
         "group_handover_hits", "store_gets", "peer_served_requests", "mem_hits", "mem_misses", "group_peers")


def counters(nodes) -> str:
    """The group counters of each node, for an assertion message (a string:
    pytest shortens a long dict)."""
    return json.dumps([{k: v for k, v in stats(m).items() if k in _KEYS} for m in nodes])


def wait_members(m, n: int) -> None:
    wait_for(lambda: stats(m).get("group_members") == n, timeout=15, what=f"{m.path} to see {n} members")


def read_all(paths) -> dict:
    """Read files in parallel threads, as a DataLoader's workers would."""
    out = {}

    def read(p):
        out[p] = p.read_bytes()
    threads = [threading.Thread(target=read, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_s3_serves_each_block_once(make_volume, mount_volume):
    vol = make_volume("s3")
    nodes = [member(mount_volume, vol) for _ in range(3)]
    for m in nodes:
        wait_members(m, 3)
    files = {f"f{i}": os.urandom(9 * MiB + i) for i in range(4)}   # 3 blocks each: 12 blocks
    for name, data in files.items():
        (nodes[0].path / name).write_bytes(data)
    for m in nodes:
        m.remount(clear_cache=True)   # empty caches everywhere: every block must come from S3
    for m in nodes:
        wait_members(m, 3)
    for m in nodes[1:]:   # two nodes read everything, at once
        got = read_all([m.path / n for n in files])
        assert {p.name: d for p, d in got.items()} == files
    assert total(nodes, "store_gets") == 12, counters(nodes)
    assert total(nodes, "group_hits") > 0 and total(nodes, "peer_served_requests") > 0
    assert total(nodes, "group_errors") == 0


def test_dead_peer_falls_back_to_s3(make_volume, mount_volume):
    vol = make_volume("s3")
    a, b = member(mount_volume, vol, timeout=3), member(mount_volume, vol, timeout=3)
    wait_members(b, 2)
    # 12 blocks: placement follows the members' random ports, and with 5
    # a owned none of them in ~3 % of runs (then b had nobody to fall back from)
    data = os.urandom(48 * MiB)
    (a.path / "f").write_bytes(data)
    b.remount(clear_cache=True)
    wait_members(b, 2)
    a.kill()   # SIGKILL: still in b's ring until its heartbeat times out
    assert (b.path / "f").read_bytes() == data   # a's blocks came from S3 instead
    s = stats(b)
    # (unless a already left b's ring: then there was nobody to ask)
    assert s.get("group_fallbacks", 0) > 0 or s.get("group_members") == 1, s
    wait_members(b, 1)   # and a leaves the ring within the timeout


def test_client_and_drained_members_own_nothing(make_volume, mount_volume):
    vol = make_volume("s3")
    owner = member(mount_volume, vol)
    drained = member(mount_volume, vol, "--group-weight", "0")
    client = mount_volume(vol, None, "--cache-group", "g", "--no-sharing")
    wait_members(client, 2)
    data = os.urandom(13 * MiB)
    (owner.path / "f").write_bytes(data)
    owner.remount(clear_cache=True)
    for m in (client, drained):   # the owner is back in both rings
        wait_members(m, 2)
    for m in (client, drained):
        assert (m.path / "f").read_bytes() == data
        s = stats(m)
        assert s.get("store_gets", 0) == 0 and s.get("group_hits", 0) == 4, s
    assert stats(owner).get("store_gets") == 4   # the owner fetched each block once
    r = run_cli("group", "status", vol.meta_url, "g", "--json", env=vol.env)
    members = json.loads(assert_ok(r).stdout)["g"]
    assert sorted((m["weight"], bool(m["address"])) for m in members) == [(0, False), (0, True), (1, True)]
    r = assert_ok(run_cli("group", "status", vol.meta_url, env=vol.env))
    assert "2 sharing members, 1 clients" in r.stdout and f"127.0.0.1:{owner.port}" in r.stdout


def test_drain_at_run_time_hands_blocks_to_their_new_owner(make_volume, mount_volume):
    """`jfscache group drain` (a scale-in's preStop): the member's weight
    becomes 0 at once, and the blocks it owned reach their new owner from it,
    not from S3; `group weight` undoes it."""
    vol = make_volume("s3")
    keep, leave = member(mount_volume, vol), member(mount_volume, vol)
    client = mount_volume(vol, None, "--cache-group", "g", "--no-sharing")
    wait_members(client, 2)
    # 16 blocks over two owners: with 6, all landed on one owner in ~3 % of
    # runs (placement follows the random ports), and the test had nothing to drain.
    files = {f"f{i}": os.urandom(8 * MiB) for i in range(8)}
    nblocks = 16
    for name, data in files.items():
        (client.path / name).write_bytes(data)
    client.remount(clear_cache=True)
    wait_members(client, 2)
    assert {p.name: d for p, d in read_all([client.path / n for n in files]).items()} == files
    owned = stats(leave).get("store_gets", 0)
    assert owned > 0 and stats(keep).get("store_gets", 0) + owned == nblocks

    r = assert_ok(run_cli("group", "drain", str(leave.path), "--idle", "1", "--timeout", "60", env=vol.env))
    assert "weight 1 -> 0" in r.stdout and "drained" in r.stdout, r.stdout
    members = json.loads(assert_ok(run_cli("group", "status", vol.meta_url, "g", "--json", env=vol.env)).stdout)["g"]
    assert {m["id"]: m["weight"] for m in members if m["address"]} == {f"127.0.0.1:{keep.port}": 1,
                                                                       f"127.0.0.1:{leave.port}": 0}
    served = stats(leave).get("peer_served_requests", 0)
    client.remount(clear_cache=True)   # (its ring starts from the members' current weights)
    before = stats(keep).get("store_gets", 0)
    assert {p.name: d for p, d in read_all([client.path / n for n in files]).items()} == files
    assert stats(keep).get("store_gets", 0) == before   # the drained member's blocks came from it
    assert stats(leave).get("peer_served_requests", 0) - served == owned

    r = assert_ok(run_cli("group", "weight", str(leave.path), "1", env=vol.env))
    assert "weight 0 -> 1" in r.stdout
    r = run_cli("group", "drain", str(client.path), env=vol.env)
    assert r.returncode == 1 and "client of the group" in r.stderr, r.stderr


def test_peers_must_know_the_group_secret(make_volume, mount_volume, redis_server):
    vol = make_volume("s3")
    m = member(mount_volume, vol)
    (m.path / "f").write_bytes(os.urandom(MiB))
    db = int(vol.meta_url.rsplit("/", 1)[1])
    secret = json.loads(redis_server.client(db).get("setting"))["group_secret"]
    addr = f"127.0.0.1:{m.port}"

    async def ask(sec: str):
        client = PeerClient(sec.encode(), timeout=5)
        try:
            return await client.check(addr, ["no/such/key"])
        finally:
            await client.aclose()

    assert trio.run(ask, secret) == [False]   # the right secret is served
    with pytest.raises(PeerError):
        trio.run(ask, "not-the-secret-" + secret)
    with socket.create_connection(("127.0.0.1", m.port), timeout=5) as s:   # garbage is dropped
        s.recv(64)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
        s.settimeout(15)
        try:
            rest = s.recv(4096)
            while rest:
                rest = s.recv(4096)
        except ConnectionResetError:
            pass
    assert stats(m).get("peer_served_auth_failures", 0) >= 2
    assert (m.path / "f").stat().st_size == MiB   # the member is still serving


def _check(path, env) -> dict:
    return json.loads(assert_ok(run_cli("warmup", "--check", "--json", path, env=env)).stdout)


def _dataset(root, extra: int = 0) -> dict:
    """4 files of 2 blocks and `extra` of 1 in train/, and one small file."""
    d = root / "dataset"
    (d / "train").mkdir(parents=True)
    files = {f"train/part{i}": os.urandom(5 * MiB + i * 1000) for i in range(4)}   # 2 blocks each
    files.update({f"train/extra{i}": os.urandom(100_000 + i) for i in range(extra)})
    files["small"] = b"tiny" * 100
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_warmup_fills_the_group_once(make_volume, mount_volume, s3_server):
    """Three members and a --no-sharing client: `jfscache warmup` from one
    node sends each block to its owner, so S3 serves each block once (counted
    by the S3 server itself), and then every node reads the whole data set
    with no S3 GET at all."""
    vol = make_volume("s3")
    nodes = [member(mount_volume, vol) for _ in range(3)]
    # 24 blocks in train/: placement follows the members' random ports, and
    # with 8 a member owned none of them in ~11 % of runs (3 x (2/3)^8)
    files = _dataset(nodes[0].path, extra=16)
    blocks = 4 * 2 + 16 + 1
    for m in nodes:
        m.remount(clear_cache=True)
    nodes.append(mount_volume(vol, None, "--cache-group", "g", "--no-sharing"))
    for m in nodes:
        wait_members(m, 3)
    gets = lambda: s3_server.requests(vol.bucket, "GET")   # noqa: E731
    d1 = nodes[1].path / "dataset"
    before = _check(d1, vol.env)
    assert (before["files"], before["blocks"], before["cached_blocks"]) == (len(files), blocks, 0)
    g0 = gets()
    r = json.loads(assert_ok(run_cli("warmup", "--json", d1, "--threads", "4", env=vol.env)).stdout)
    assert (r["files"], r["blocks"], r["done_blocks"], r["errors"]) == (len(files), blocks, blocks, 0)
    assert r["bytes"] == sum(map(len, files.values()))
    assert gets() - g0 == blocks   # each block once, group-wide
    after = _check(nodes[3].path / "dataset" / "train", vol.env)
    assert after["cached_ratio"] == 1.0 and len(after["per_member"]) == 3, after
    g1 = gets()
    for m in nodes:
        for name, data in files.items():
            assert (m.path / "dataset" / name).read_bytes() == data
    assert gets() == g1, "a read after the warmup went to S3"
    assert stats(nodes[3]).get("store_gets", 0) == 0
    # again: everything is cached already, S3 sees nothing new
    r = json.loads(assert_ok(run_cli("warmup", "--json", d1, env=vol.env)).stdout)
    assert r["cached_blocks"] == blocks and gets() == g1
    # evict drops it from the group; a background warmup brings it back
    r = json.loads(assert_ok(run_cli("warmup", "--evict", "--json", d1, env=vol.env)).stdout)
    assert r["cached_blocks"] == blocks
    assert _check(d1, vol.env)["cached_ratio"] == 0.0
    r = assert_ok(run_cli("warmup", "--background", d1, env=vol.env))
    assert "background" in r.stdout
    wait_for(lambda: _check(d1, vol.env)["cached_ratio"] == 1.0, timeout=30, what="the background warmup")
    # and from a machine with no mount, given the metadata URL
    assert_ok(run_cli("warmup", "--evict", "--meta", vol.meta_url, "/dataset/train", env=vol.env))
    assert _check(d1, vol.env)["cached_blocks"] == 1   # only "small" is left
    r = json.loads(assert_ok(run_cli("warmup", "--json", "--meta", vol.meta_url, "/dataset", env=vol.env)).stdout)
    assert (r["blocks"], r["cached_blocks"], r["errors"]) == (blocks, 1, 0)
    assert _check(d1, vol.env)["cached_ratio"] == 1.0


class Readers:
    """Threads that read files over and over and verify every byte, dropping
    the page cache of each file first so that every pass reaches the daemon."""

    def __init__(self, files: dict, roots: list):
        self.files, self.roots = files, roots
        self.errors: list[str] = []
        self.passes = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(r,)) for r in roots]

    def _run(self, root):
        while not self.stop.is_set():
            for name, data in self.files.items():
                try:
                    fd = os.open(root / "dataset" / name, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        got = b"".join(iter(lambda: os.read(fd, MiB), b""))
                    finally:
                        os.close(fd)
                    if got != data:
                        self.errors.append(f"{root}/{name}: wrong bytes")
                except OSError as e:
                    self.errors.append(f"{root}/{name}: {e}")
            self.passes += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_passes(self, n: int) -> None:
        target = self.passes + n
        wait_for(lambda: self.passes >= target or self.errors, timeout=60, what=f"{n} more read passes")


def test_member_killed_in_the_middle_of_reads(make_volume, mount_volume):
    vol = make_volume("s3")
    small = ("--mem-cache-size", "4M")   # so readers keep asking the owners
    nodes = [member(mount_volume, vol, *small) for _ in range(3)]
    files = _dataset(nodes[0].path, extra=16)  # 25 blocks: with 9, nodes[0] owned none in ~2.6 % of runs
    for m in nodes:
        wait_members(m, 3)
    assert_ok(run_cli("warmup", nodes[0].path / "dataset", env=vol.env))
    with Readers(files, [m.path for m in nodes[1:]]) as readers:
        readers.wait_passes(2)
        nodes[0].kill()
        readers.wait_passes(6)
    assert not readers.errors, readers.errors[:5]
    assert total(nodes[1:], "group_fallbacks") + total(nodes[1:], "group_errors") > 0, counters(nodes[1:])


def test_member_joins_while_readers_run(make_volume, mount_volume, s3_server):
    """After a join, the new owner of a block first asks its previous owner:
    no read fails, and S3 serves nothing new for a warm data set."""
    vol = make_volume("s3")
    small = ("--mem-cache-size", "4M")
    nodes = [member(mount_volume, vol, *small) for _ in range(2)]
    # 49 blocks. Only blocks that move from nodes[0] to the new member reach
    # it: nodes[0] wrote them all and keeps them on disk, and nodes[1] keeps
    # what it owned before. With 18 blocks none moved that way in ~4 % of runs
    # ((5/6)^18; placement follows the random ports); with 49, ~0.01 %.
    files = _dataset(nodes[0].path, extra=40)
    for m in nodes:
        wait_members(m, 2)
    assert_ok(run_cli("warmup", nodes[0].path / "dataset", env=vol.env))
    g0 = s3_server.requests(vol.bucket, "GET")
    with Readers(files, [m.path for m in nodes]) as readers:
        readers.wait_passes(2)
        new = member(mount_volume, vol, *small)
        for m in nodes:
            wait_members(m, 3)
        readers.wait_passes(4)
    assert not readers.errors, readers.errors[:5]
    assert stats(new).get("group_handover_hits", 0) > 0, counters(nodes + [new])
    assert total(nodes + [new], "store_gets") == 0, "a block came from S3 after the join"
    # S3's own count: only the new member's mount check (bucket and test object)
    assert s3_server.requests(vol.bucket, "GET") - g0 <= 2


def test_warmup_errors(make_volume, mount_volume, tmp_dir):
    vol = make_volume("file")
    m = mount_volume(vol)
    (m.path / "f").write_bytes(b"x")
    r = run_cli("warmup", tmp_dir)   # not a jfscache mount
    assert r.returncode != 0 and "not a jfscache mount" in r.stderr
    r = run_cli("warmup", m.path / "missing")
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = assert_ok(run_cli("warmup", m.path / "f"))   # no group: the local cache
    assert "1 files, 1 blocks" in r.stdout


DATALOADER = r"""
import hashlib, json, os, sys
import torch
from torch.utils.data import DataLoader, Dataset

root = sys.argv[1]

class Files(Dataset):
    def __init__(self):
        self.names = sorted(os.listdir(root))
    def __len__(self):
        return len(self.names)
    def __getitem__(self, i):
        with open(os.path.join(root, self.names[i]), "rb") as f:
            data = f.read()
        return self.names[i], hashlib.sha256(data).hexdigest(), len(data)

seen = {}
for names, digests, sizes in DataLoader(Files(), batch_size=64, num_workers=4, shuffle=True,
                                        generator=torch.Generator().manual_seed(1)):
    for n, d, s in zip(names, digests, sizes):
        seen[n] = [d, int(s)]
print(json.dumps(seen))
"""


def _sample(i: int) -> bytes:
    """File i's content, derivable from its index alone."""
    seed = i.to_bytes(4, "little")
    return (seed * 4096)[: 8192 + (i * 37) % 16384]


def test_dataloader_epoch_after_warmup(make_volume, mount_volume, s3_server):
    """A PyTorch DataLoader (4 workers, shuffled) reads 800 files through a
    group member after a warmup: every sample is verified, no S3 GET."""
    import hashlib
    import subprocess
    import sys
    vol = make_volume("s3")
    a, b = member(mount_volume, vol), member(mount_volume, vol)
    d = a.path / "samples"
    d.mkdir()
    n = 800
    for i in range(n):
        (d / f"{i:05d}.bin").write_bytes(_sample(i))
    for m in (a, b):
        m.remount(clear_cache=True)
    for m in (a, b):
        wait_members(m, 2)
    r = json.loads(assert_ok(run_cli("warmup", "--json", b.path / "samples", env=vol.env)).stdout)
    assert (r["files"], r["blocks"], r["errors"]) == (n, n, 0)
    g0 = s3_server.requests(vol.bucket, "GET")
    out = subprocess.run([sys.executable, "-c", DATALOADER, str(b.path / "samples")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    assert len(seen) == n
    for i in range(n):
        data = _sample(i)
        assert seen[f"{i:05d}.bin"] == [hashlib.sha256(data).hexdigest(), len(data)], i
    assert s3_server.requests(vol.bucket, "GET") == g0


def test_wildcard_listen_on_a_host_named_loopback_is_refused(make_volume, mounts):
    """Listening on 0.0.0.0, a member advertises its host's address; if the
    host name resolves to loopback (Debian: 127.0.1.1), every member would
    register as the same unreachable address, so the mount refuses."""
    if not socket.gethostbyname(socket.gethostname()).startswith("127."):
        pytest.skip("this host's name resolves to a routable address")
    from test_cli import expect_mount_failure
    from helpers import assert_clean_error
    vol = make_volume("file")
    mp = new_dir("mnt")
    r = expect_mount_failure(mounts, ["mount", vol.meta_url, mp, "--cache-group", "g",
                                      "--group-listen", f"0.0.0.0:{free_port()}"], mp, env=vol.env)
    assert_clean_error(r, r"resolves to 127\..*--group-listen", strict=False)


def test_members_talk_mutual_tls(make_volume, mount_volume, tmp_dir):
    """--group-tls-cert/-key/-ca: blocks travel between members over TLS (the
    client reads every block from its owner, none from S3), and a member
    without TLS is refused by the others."""
    from helpers import make_certs
    c = make_certs(tmp_dir)
    tls = ("--group-tls-cert", c / "server.pem", "--group-tls-key", c / "server.key", "--group-tls-ca", c / "ca.pem")
    vol = make_volume("s3")
    owner = member(mount_volume, vol, *tls)
    client = mount_volume(vol, None, "--cache-group", "g", "--no-sharing", *tls)
    wait_members(client, 1)
    data = os.urandom(9 * MiB)
    (owner.path / "f").write_bytes(data)
    assert (client.path / "f").read_bytes() == data
    s = stats(client)
    assert s.get("store_gets", 0) == 0 and s.get("group_hits", 0) == 3, s

    plain = mount_volume(vol, None, "--cache-group", "g", "--no-sharing")
    wait_members(plain, 1)
    assert (plain.path / "f").read_bytes() == data   # from S3: the owner does not talk to it
    assert stats(plain).get("store_gets", 0) >= 1
    assert stats(owner).get("peer_served_auth_failures", 0) >= 1
