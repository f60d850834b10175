"""What a listing leaves behind must not make later operations in that
directory dearer: counted in Redis commands, not timed."""
from __future__ import annotations

import os
import time

import pytest

from helpers import new_dir

pytestmark = pytest.mark.usefixtures("own_servers")


def _hmget_calls(client) -> int:
    """HMGETs: attributes (one per inode) and batches of directory entries."""
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_renames_and_unlinks_after_a_listing_cost_no_batch_lookups(make_volume, mount_volume, redis_server):
    """After `ls`, the names of a listing are looked up 256 at a time when
    the kernel's entries expire. A rename or unlink in that directory must
    forget only its own names: forgetting the directory's whole entry cache
    made every later lookup fetch the next 256 names again (~256 HMGETs per
    rename, 15 x slower renames in the bench)."""
    vol = make_volume("file")
    m = mount_volume(vol, None)
    d = new_dir("many", parent=m.path)
    n = 600
    for i in range(n):
        os.close(os.open(d / f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
    client = redis_server.client()
    for op in ("rename", "unlink"):
        assert len(os.listdir(d)) == n
        time.sleep(1.1)   # the kernel's entries and attributes expire (1 s)
        before = _hmget_calls(client)
        for i in range(n):
            if op == "rename":
                os.rename(d / f"f{i:04d}", d / f"g{i:04d}")
            else:
                os.unlink(d / f"g{i:04d}")
        per_op = (_hmget_calls(client) - before) / n
        # ~2-7 (the directory's and the inode's attributes, a batch of 256
        # names per second); forgetting every name made it ~100.
        assert per_op < 30, f"{per_op:.1f} HMGETs per {op}"
    assert os.listdir(d) == []


def test_fetch_ahead_follows_the_pass_not_the_listing():
    """A pass over a listing fetches ahead in doubling windows while it
    follows the listing, and one entry at a time when it does not."""
    from jfscache.vfs.vfs import LIST_AHEAD, _Pass

    p = _Pass(list(range(5000)))
    spans, i = [], 0
    while i < 2000:                      # in order, as ls -l or find
        b = p.batch(i)
        assert b[0] == i
        spans.append(len(b))
        i += len(b)
    assert spans[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256] and set(spans[9:]) == {LIST_AHEAD}
    assert len(p.batch(i + 3)) == LIST_AHEAD   # a few entries the kernel still had: still in order
    assert p.batch(17) == [17]                  # elsewhere: one entry
    assert p.batch(4000) == [4000] and p.batch(4001) == [4001, 4002]


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_stat_pass_after_a_listing_fetches_what_it_uses(make_volume, mount_volume, redis_server, order):
    """Listings come in name order, so a sorted stat pass after `ls` (what
    ls -l does once the listing's attributes expired) fetches attributes
    ahead; a shuffled one (a DataLoader's) fetches one file's at a time.
    Fetching the next 256 of the listing for every miss, as before, cost 23
    HMGETs per stat here in the shuffled pass (up to 257 in a bigger
    directory), and 26 in the sorted one while listings came in Redis's
    hash order."""
    import random

    m = mount_volume(make_volume("file"), None)
    d = new_dir("pass", parent=m.path)
    names = [f"f{i:04d}" for i in range(3000)]
    for name in names:
        os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT, 0o644))
    client = redis_server.client()
    assert os.listdir(d) == names
    time.sleep(1.1)   # the kernel's entries and attributes expire (1 s)
    # 300 of 3,000: a batch of 256 fetched for one file rarely covers the next
    used = names[:300] if order == "sorted" else random.Random(7).sample(names, 300)
    before = _hmget_calls(client)
    for name in used:
        os.stat(d / name)
    per_stat = (_hmget_calls(client) - before) / len(used)
    assert per_stat < (3 if order == "sorted" else 10), f"{per_stat:.1f} HMGETs per stat ({order})"


def test_shuffled_reads_after_a_listing_cost_one_round_trip_per_file(make_volume, mount_volume, redis_server):
    """A DataLoader lists its directory, then opens and reads the files in
    shuffled order. Each such file is one Redis command from the daemon: the
    lookup script, which brings chunk 0's slices for the read. Looking a
    listed name up through the listing's batch path with a window of one
    entry had cost three (the entry, the attributes, then the slices at the
    first read). Counted with MONITOR, without the commands scripts run."""
    import random
    import threading

    m = mount_volume(make_volume("file"), None)
    d = new_dir("shuffled", parent=m.path)
    names = [f"f{i:04d}" for i in range(400)]
    for name in names:
        (d / name).write_bytes(name.encode())
    assert sorted(os.listdir(d)) == names
    time.sleep(1.1)   # the kernel's entries expire (1 s)
    used = random.Random(3).sample(names, 100)

    client = redis_server.client()
    marker = "end-of-shuffled-pass"
    seen: list[dict] = []
    with client.monitor() as mon:
        def collect():
            while True:
                c = mon.next_command()
                if marker in c["command"]:
                    return
                if c.get("client_type") != "lua":
                    seen.append(c)
        t = threading.Thread(target=collect, daemon=True)
        t.start()
        time.sleep(0.2)
        for name in used:
            assert (d / name).read_bytes() == name.encode()
        redis_server.client().echo(marker)
        t.join(timeout=30)
    assert not t.is_alive()
    per_file = len(seen) / len(used)
    assert per_file < 1.6, f"{per_file:.2f} commands per file: {[c['command'] for c in seen[:12]]}"


def test_a_plain_listing_fetches_few_attributes_and_ls_l_still_gets_them(make_volume, mount_volume, redis_server):
    """The kernel asks for attributes (READDIRPLUS) in the first request of
    a listing and where it expects lookups, and for names only (READDIR)
    in the rest of a listing nobody stats (`ls`, os.listdir, a DataLoader's
    file list). Before, every entry's attributes were fetched: 3,000
    HMGETs here. Entry types still arrive without a stat, and `ls -l`
    still gets attributes with the listing (no lookup per file)."""
    import json
    import subprocess

    m = mount_volume(make_volume("file"), None)
    d = new_dir("plain", parent=m.path)
    n = 3000
    for i in range(n):
        os.close(os.open(d / f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
    os.mkdir(d / "sub")
    os.symlink("f0000", d / "link")
    client = redis_server.client()

    def lookups() -> int:
        with open(m.path / ".stats") as f:
            return json.load(f)["fuse_ops"].get("lookup", {}).get("count", 0)

    time.sleep(1.1)   # the kernel's cached listing and attributes expire (1 s)
    before = _hmget_calls(client)
    with os.scandir(d) as it:
        types = {e.name: (e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False), e.is_symlink())
                 for e in it}
    fetched = _hmget_calls(client) - before
    assert len(types) == n + 2
    assert types["f0001"] == (True, False, False)
    assert types["sub"] == (False, True, False) and types["link"] == (False, False, True)
    # one batch for the first request (512 at most), none for the rest
    assert fetched < n / 4, f"{fetched} HMGETs for a listing of {n + 2}"

    time.sleep(1.1)
    before = lookups()
    out = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == n + 3   # "total" and the entries
    assert lookups() - before < 10


def test_no_xattr_mount_answers_xattrs_in_the_kernel(make_volume, mount_volume, tmp_dir):
    """--no-xattr: the first xattr query is answered "not implemented", the
    kernel answers every later one itself (`ls -l` and writes cost no xattr
    round trip), and tools that copy xattrs where they can still work."""
    import errno
    import json
    import subprocess

    vol = make_volume("file")
    m = mount_volume(vol, None, "--no-xattr")
    d = new_dir("plain", parent=m.path)
    for i in range(200):
        (d / f"f{i:03d}").write_bytes(b"x")
    subprocess.run(["ls", "-l", str(d)], check=True, stdout=subprocess.DEVNULL)
    for call in (lambda: os.setxattr(d / "f000", "user.k", b"v"), lambda: os.getxattr(d / "f001", "user.k"),
                 lambda: os.listxattr(d / "f002")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EOPNOTSUPP
    ops = json.loads((m.path / ".stats").read_bytes())["fuse_ops"]
    # Once per kind of call (the kernel keeps a flag for each); 200 files
    # written and listed with ls -l asked ~400 times without --no-xattr.
    assert all(ops.get(op, {}).get("count", 0) <= 1 for op in ("getxattr", "listxattr", "setxattr")), ops
    src = tmp_dir / "src"
    src.write_bytes(b"data")
    os.setxattr(src, "user.k", b"v")
    subprocess.run(["cp", "-a", str(src), str(d / "copied")], check=True)
    assert (d / "copied").read_bytes() == b"data"


def test_ls_l_asks_for_xattrs_once_per_listing_not_once_per_file(make_volume, mount_volume):
    """ls -l asks each file for its SELinux label and its ACL; both answer
    EOPNOTSUPP (vfs.UNSUPPORTED_XATTRS), and ls then stops asking for the rest
    of the device. Answered "no such attribute", it asked once per file: a
    FUSE round trip each, most of the time of `ls -l` on a big directory."""
    import json
    import subprocess

    m = mount_volume(make_volume("file"))
    d = new_dir("labels", parent=m.path)
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"x")
    os.setxattr(d / "f007", "user.k", b"v")  # an inode with xattrs changes nothing

    def xattr_requests():
        ops = json.loads((m.path / ".stats").read_bytes())["fuse_ops"]
        return sum(ops.get(op, {}).get("count", 0) for op in ("getxattr", "listxattr"))

    before = xattr_requests()
    out = subprocess.run(["ls", "-l", str(d)], check=True, capture_output=True, text=True).stdout
    asked = xattr_requests() - before
    assert len(out.splitlines()) == 301  # "total" and every file, with no "+" or "." after the modes
    assert all(line.startswith("-rw-r--r-- ") for line in out.splitlines()[1:]), out[:500]
    assert asked <= 4, f"ls -l of 300 files made {asked} xattr requests"


def test_a_listing_repeated_within_the_attribute_timeout_comes_from_the_kernel(make_volume, mount_volume):
    """A repeated `ls`, or each DataLoader worker listing the same directory:
    within the attribute timeout of the daemon's last listing, the kernel
    serves it from its cache (no readdir reaches the daemon). A change made
    through this mount shows at once; after the timeout the listing is a
    fresh one again, so another node's changes show as late as a stat
    would show them."""
    import json

    vol = make_volume("file")
    a = mount_volume(vol, None, "--attr-timeout", "30", "--entry-timeout", "30")
    b = mount_volume(vol, None)
    d = new_dir("many", parent=a.path)
    for i in range(300):
        (d / f"f{i:03d}").write_bytes(b"x")

    def readdirs(m) -> int:
        with open(m.path / ".stats") as f:
            return json.load(f)["fuse_ops"].get("readdir", {}).get("count", 0)

    assert len(os.listdir(d)) == 300
    first = readdirs(a)
    assert first > 0
    for _ in range(5):
        assert len(os.listdir(d)) == 300
    assert readdirs(a) == first   # from the kernel's cache
    (d / "new").write_bytes(b"new")   # a change through this mount
    assert "new" in os.listdir(d) and readdirs(a) > first

    db = b.path / d.name
    assert len(os.listdir(db)) == 301
    first = readdirs(b)
    assert len(os.listdir(db)) == 301 and readdirs(b) == first
    (d / "newer").write_bytes(b"x")   # through the other mount
    time.sleep(1.2)   # b's attribute timeout (1 s)
    assert "newer" in os.listdir(db) and readdirs(b) > first
