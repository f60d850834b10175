"""systemd integration: the daemon run as a Type=notify unit would be, with a
fake NOTIFY_SOCKET: READY=1 arrives only once the mount answers, STOPPING=1
on the way down. The unit files parse as the daemon expects them to."""
from __future__ import annotations

import configparser
import socket
from pathlib import Path

import pytest

from helpers import new_dir

ROOT = Path(__file__).resolve().parent.parent


def test_ready_after_the_mount_works(make_volume, mounts, tmp_dir):
    vol = make_volume("file")
    path = str(tmp_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        mp = new_dir("mnt")
        env = dict(vol.env, NOTIFY_SOCKET=path)
        m = mounts.start(["mount", vol.meta_url, str(mp), "--cache-dir", str(new_dir("cache"))], mp, env)
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={m.proc.pid}" in msg
        (mp / "works").write_bytes(b"yes")   # the mount answered before READY (checked by the daemon)
        m.umount()
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        sock.close()


@pytest.mark.parametrize("unit", ["jfscache@.service", "jfscache-group@.service"])
def test_unit_files(unit):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(ROOT / "systemd" / unit)
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["ExecStart"].startswith("/usr/local/bin/jfscache mount ${META_URL} ${MOUNTPOINT}")
    assert "fusermount3 -uz" in svc["ExecStopPost"] and svc["Restart"] == "on-failure"
    assert "/dev/fuse" in svc["DeviceAllow"]
    # no option that gives the unit a private mount namespace (the mount would be invisible)
    for opt in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "PrivateMounts"):
        assert opt not in svc
    env = (ROOT / "systemd" / "jfscache.env.example").read_text()
    for var in ("META_URL", "META_PASSWORD", "MOUNTPOINT", "MOUNT_OPTIONS", "GROUP", "GROUP_LISTEN",
                "AWS_SECRET_ACCESS_KEY"):
        assert f"{var}=" in env
