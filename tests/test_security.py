"""Secrets and transport security, through the CLI and a mount:

- Redis over TLS (rediss://, verified against the test's own CA) with a
  password given as META_PASSWORD in a 0600 secrets file, as are the S3 keys;
- no secret (Redis password, S3 secret key, the volume's group secret)
  appears in the daemon's argv, its log or `jfscache status`;
- a secrets file others can read, a wrong CA and a wrong password are
  refused with one line.
"""
from __future__ import annotations

import json
import re
import os
import signal
import socket
import ssl
import subprocess
import time

import pytest

from helpers import (assert_clean_error, assert_ok, die_with_parent, free_port, log_tail, make_certs, new_dir,
                     run_cli, stop_process)

pytestmark = pytest.mark.usefixtures("own_servers")

PASSWORD = "pw-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def certs():
    return make_certs(new_dir("certs"))


@pytest.fixture(scope="module")
def tls_redis(certs):
    """A redis-server that speaks only TLS and wants a password: its port."""
    work = new_dir("tlsredis")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key"),
         "--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(work),
         "--logfile", str(work / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=die_with_parent())
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                if s.recv(64):
                    break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("TLS redis-server did not start:\n" + log_tail(work / "redis.log"))
            time.sleep(0.1)
    yield port
    stop_process(proc, signal.SIGTERM)


def _secrets_file(s3_server, mode=0o600):
    p = new_dir("secrets") / "jfscache.secrets"
    env = s3_server.env
    p.write_text(f"# jfscache secrets\nMETA_PASSWORD={PASSWORD}\n"
                 f"AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}\n"
                 f"AWS_SECRET_ACCESS_KEY='{env['AWS_SECRET_ACCESS_KEY']}'\n")
    os.chmod(p, mode)
    return p


def _bare_env() -> dict:
    """The environment without any credentials: they come from the file."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "META_PASSWORD"))}


def test_tls_redis_with_password_from_a_secrets_file(tls_redis, certs, s3_server, mounts):
    secrets = _secrets_file(s3_server)
    url = f"rediss://127.0.0.1:{tls_redis}/1?tls-ca-cert-file={certs / 'ca.pem'}"
    env = dict(_bare_env(), JFSCACHE_SECRETS_FILE=str(secrets))
    bucket = s3_server.bucket_url("sec-" + os.urandom(4).hex())
    assert_ok(run_cli("format", url, "secure", "--storage", "s3", "--bucket", bucket, env=env))

    mp = new_dir("mnt")
    m = mounts.start(["--secrets-file", str(secrets), "mount", url, str(mp), "--cache-dir", str(new_dir("cache"))],
                     mp, _bare_env())
    (mp / "f").write_bytes(b"through TLS")
    assert (mp / "f").read_bytes() == b"through TLS"

    status = assert_ok(run_cli("status", url, env=env)).stdout
    assert json.loads(status)["sessions"], status
    import redis
    r = redis.Redis(host="127.0.0.1", port=tls_redis, db=1, password=PASSWORD, ssl=True,
                    ssl_ca_certs=str(certs / "ca.pem"))
    group_secret = json.loads(r.get("setting"))["group_secret"]
    cmdline = open(f"/proc/{m.proc.pid}/cmdline", "rb").read().decode()
    m.umount()
    secrets_seen = {"Redis password": PASSWORD, "S3 secret key": s3_server.env["AWS_SECRET_ACCESS_KEY"],
                    "group secret": group_secret}
    for what, secret in secrets_seen.items():
        for where, text in (("argv", cmdline), ("log", m.log_text()), ("status", status)):
            assert secret not in text, f"the {what} shows in the {where}"


def test_secrets_file_readable_by_others_is_refused(s3_server, redis_server):
    secrets = _secrets_file(s3_server, mode=0o644)
    r = run_cli("--secrets-file", str(secrets), "status", redis_server.url(1))
    assert_clean_error(r, rf"secrets file {secrets} is readable by others \(mode 0644\): chmod 600")
    secrets.write_text("PASSWORD=x\n")
    os.chmod(secrets, 0o600)
    assert_clean_error(run_cli("--secrets-file", str(secrets), "status", redis_server.url(1)),
                       r"line 1: expected KEY=VALUE with KEY one of META_PASSWORD")


def test_tls_redis_wrong_ca_or_password(tls_redis, certs):
    base = f"rediss://127.0.0.1:{tls_redis}/1"
    env = dict(_bare_env(), META_PASSWORD=PASSWORD)
    r = run_cli("status", f"{base}?tls-ca-cert-file={certs / 'other.pem'}", env=env)
    assert_clean_error(r, r"Redis at 127.0.0.1:\d+ db 1.*certificate verify failed")
    r = run_cli("status", f"{base}?tls-ca-cert-file={certs / 'ca.pem'}", env=dict(env, META_PASSWORD="wrong"))
    assert_clean_error(r, r"refused the connection: WRONGPASS")
    r = run_cli("status", f"{base}?tls-ca-cert-file={certs / 'missing.pem'}", env=env)
    assert_clean_error(r, r"invalid TLS settings in the Redis URL")


def test_subdir_confines_a_mount_to_its_subtree(make_volume, mount_volume, mounts):
    vol = make_volume("file")
    full = mount_volume(vol)
    (full.path / "team-a" / "data").mkdir(parents=True)
    (full.path / "team-a" / "data" / "f").write_bytes(b"a's data")
    (full.path / "team-b").mkdir()
    (full.path / "team-b" / "secret").write_bytes(b"b's secret")
    (full.path / "top").write_bytes(b"volume root")
    os.symlink("../team-b/secret", full.path / "team-a" / "rel")
    os.symlink("/team-b/secret", full.path / "team-a" / "abs")

    a = mount_volume(vol, None, "--subdir", "/team-a/")
    assert sorted(os.listdir(a.path)) == ["abs", "data", "rel"]
    assert (a.path / "data" / "f").read_bytes() == b"a's data"
    assert os.stat(a.path).st_ino == 1   # the subtree's root is the mount's root
    assert os.listdir(a.path / "data" / ".." / "data") == ["f"]
    # '..' at the root leaves the mount; symlinks resolve on this host, not in the volume.
    for p in ("../team-b/secret", "rel", "abs", "data/../../top"):
        assert not os.path.exists(a.path / p), p
    for e in os.scandir(a.path):  # and readdir's '..' names no inode above the root
        assert e.name != ".."
    (a.path / "new").write_bytes(b"made in a")
    assert (full.path / "team-a" / "new").read_bytes() == b"made in a"
    assert json.loads((a.path / ".stats").read_bytes())["fuse_write_bytes"] >= 9

    for sub, why in (("/nope", r"'nope' no such file or directory in volume"),
                     ("top", r"'top' is not a directory in volume"),
                     ("team-a/../team-b", r"give a path without '\.' or '\.\.'")):
        mp = new_dir("mnt")
        mounts.track_mountpoint(mp)
        r = run_cli("mount", vol.meta_url, str(mp), "--subdir", sub, "--cache-dir", str(new_dir("cache")),
                    env=vol.env)
        assert_clean_error(r, rf"--subdir '{re.escape(sub)}': {why}")
