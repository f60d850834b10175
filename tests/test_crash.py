"""A daemon killed with SIGKILL in the middle of a workload: every file
fsync'd before the kill has exactly its content after a remount, the tree is
consistent, and the next `mount` (or `umount`) finds and clears the stale
mount point. `umount` also ends a mount whose daemon hangs."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from helpers import MiB, assert_ok, is_mounted, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("own_servers")



def test_sigkill_mid_workload_keeps_fsyncd_files(make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    synced: dict[str, bytes] = {}
    stop = threading.Event()

    def work(k: int):
        d = m.path / f"w{k}"
        d.mkdir()
        i = 0
        while not stop.is_set():
            name = f"w{k}/f{i:04d}"
            data = os.urandom((i * 7919) % (3 * MiB) + 1)
            try:
                fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    if i % 2 == 0:   # half the files are fsync'd; the rest may be lost
                        os.fsync(fd)
                        synced[name] = data
                finally:
                    os.close(fd)
                if i % 5 == 4:   # renames and unlinks too
                    os.rename(m.path / name, m.path / (name + ".r"))
                    if name in synced:
                        synced[name + ".r"] = synced.pop(name)
            except OSError:
                return   # the daemon is gone
            i += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(synced) >= 30, timeout=120, what="the workload to fsync 30 files")
    m.kill()   # SIGKILL, and a lazy unmount of what is left
    stop.set()
    for t in threads:
        t.join(60)
    m.start()
    for name, data in synced.items():
        assert (m.path / name).read_bytes() == data, name
    for dirpath, dirs, files in os.walk(m.path):   # every entry resolves
        for f in files:
            os.stat(os.path.join(dirpath, f))
    m.remount(clear_cache=True)   # and from the object store, not the cache
    for name, data in synced.items():
        assert (m.path / name).read_bytes() == data, name


def test_stale_mount_point_is_recovered(make_volume, mounts):
    vol = make_volume("file")
    m = mounts.mount(vol)
    (m.path / "f").write_bytes(b"kept")
    m.proc.kill()   # SIGKILL, leaving the FUSE mount behind
    m.proc.wait()
    with pytest.raises(OSError):
        os.stat(m.path)
    assert is_mounted(m.path)
    r = run_cli("mount", vol.meta_url, m.path, "--cache-dir", m.cache_dir, "-d", env=vol.env)
    mounts.track_mountpoint(m.path)
    assert_ok(r)
    assert "stale mount" in r.stderr
    assert (m.path / "f").read_bytes() == b"kept"
    assert_ok(run_cli("umount", m.path))


def test_umount_clears_a_killed_daemons_mount(make_volume, mounts):
    """Before, `jfscache umount` said "not mounted" here once the kernel's
    cached attributes of the root had expired: it asked os.path.ismount,
    whose stat then failed (ENOTCONN)."""
    vol = make_volume("file")
    m = mounts.mount(vol)
    m.proc.kill()
    m.proc.wait()
    time.sleep(1.5)  # past --attr-timeout (1 s): as a user who comes back later
    r = run_cli("umount", m.path)
    assert_ok(r)
    assert "stale mount" in r.stderr
    assert not is_mounted(m.path)


def test_umount_ends_a_mount_whose_daemon_hangs(make_volume, mounts):
    """A stopped daemon answers nothing; `umount` (and `mount` on the same
    point) used to hang in a stat of the mount point. They now ask from a
    child process and give up after 10 s: `mount` refuses, `umount` says so
    and unmounts."""
    vol = make_volume("file")
    m = mounts.mount(vol)
    (m.path / "f").write_bytes(b"x")
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        # A second mount there is refused, and says why, instead of hanging too.
        r = run_cli("mount", vol.meta_url, m.path, "--cache-dir", m.cache_dir, env=vol.env, timeout=60)
        assert r.returncode == 1 and "already a mount point, whose daemon does not answer" in r.stderr, r.stderr
        r = run_cli("umount", m.path, timeout=60)  # (it hung for good before)
        assert_ok(r)
        assert "has not answered" in r.stderr, r.stderr
        assert not is_mounted(m.path)
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    m.proc.wait(timeout=30)  # its device is gone: it ends on its own
