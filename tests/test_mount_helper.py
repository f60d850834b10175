"""`mount -t jfscache` and /etc/fstab lines, through the mount.jfscache
helper that mount(8) runs from /sbin."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_ok, is_mounted, new_dir, run_cli
from jfscache.mount_helper import translate

HELPER = Path("/sbin/mount.jfscache")


def test_options_translate_to_flags():
    assert translate("_netdev,defaults,cache-dir=/nvme/jfs,cache-size=400G,no-sharing,x-systemd.automount") == \
        ["--cache-dir", "/nvme/jfs", "--cache-size", "400G", "--no-sharing"]
    with pytest.raises(SystemExit):
        translate("ro")


@pytest.fixture
def helper_installed():
    """The documented install step: a symlink in /sbin (removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to install /sbin/mount.jfscache and to mount")
    ours = Path(sys.executable).parent / "mount.jfscache"
    existed = HELPER.is_symlink() or HELPER.exists()
    if not existed:
        HELPER.symlink_to(ours)
    yield
    if not existed:
        HELPER.unlink()


@pytest.mark.parametrize("how", ["mount -t", "fstab"])
def test_mount_through_mount8(how, helper_installed, make_volume, mounts, tmp_dir):
    vol = make_volume("file")
    mp, cache = new_dir("mnt"), new_dir("cache")
    mounts.track_mountpoint(mp)
    opts = f"_netdev,cache-dir={cache},cache-size=100M,attr-timeout=2"
    if how == "mount -t":
        cmd = ["mount", "-t", "jfscache", vol.meta_url, str(mp), "-o", opts]
    else:
        fstab = tmp_dir / "fstab"
        fstab.write_text(f"# test fstab\n{vol.meta_url}  {mp}  jfscache  {opts}  0 0\n")
        cmd = ["mount", "--fstab", str(fstab), str(mp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=vol.env)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mp)
    (mp / "hello").write_bytes(b"via mount(8)")
    assert (mp / "hello").read_bytes() == b"via mount(8)"
    assert (cache / "jfscache.log").exists()   # the cache-dir option arrived
    assert_ok(run_cli("umount", mp))
