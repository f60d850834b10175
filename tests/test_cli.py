"""The command line: bad input gets one clear line on stderr, a non-zero exit
and no traceback; format, status, mount (-d, foreground, embedded) and
umount do what they say."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import (
    JFSCACHE,
    MiB,
    assert_clean_error,
    assert_ok,
    describe,
    free_port,
    is_mounted,
    new_dir,
    pids_with_arg,
    run_cli,
    unique_bucket,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("own_servers")

FAIL_FAST = 30   # seconds a failing command may take (it must not hang or retry forever)



def closed_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/1"


def expect_mount_failure(mounts, args: list[str], mountpoint: Path, env=None,
                         timeout: float = FAIL_FAST) -> subprocess.CompletedProcess:
    """Run a `jfscache mount ...` that must fail. If it mounts or hangs
    instead, it is cleaned up and the test fails."""
    mounts.track_mountpoint(mountpoint)
    proc = subprocess.Popen([*JFSCACHE, *map(str, args)], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`jfscache {' '.join(map(str, args))}` did not fail within {timeout}s "
                    f"(mounted: {is_mounted(mountpoint)})\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("command", ["format", "status", "mount"])
def test_redis_unreachable(command, mounts, tmp_dir):
    url = closed_redis_url()
    port = url.rsplit(":", 1)[1].split("/")[0]
    pattern = rf"redis|connect|refused|unreachable|{port}"
    if command == "format":
        r = run_cli("format", url, "vol", "--storage", "file", "--bucket",
                    tmp_dir / "store", timeout=FAIL_FAST)
        assert_clean_error(r, pattern)
    elif command == "status":
        assert_clean_error(run_cli("status", url, timeout=FAIL_FAST), pattern)
    else:
        assert_mount_fails(mounts, url, pattern)


def assert_mount_fails(mounts, url: str, pattern: str) -> None:
    """`jfscache mount URL MP` fails with a clear error matching pattern and leaves nothing mounted."""
    mp = new_dir("mnt")
    r = expect_mount_failure(mounts, ["mount", url, mp, "--cache-dir", new_dir("cache")], mp)
    assert_clean_error(r, pattern, strict=False)
    assert not is_mounted(mp)


@pytest.mark.parametrize("command", ["status", "mount"])
def test_volume_not_formatted(command, redis_server, mounts):
    url = redis_server.url(redis_server.new_db())
    pattern = r"not formatted|format"
    if command == "status":
        assert_clean_error(run_cli("status", url, timeout=FAIL_FAST), pattern)
    else:
        assert_mount_fails(mounts, url, pattern)


def test_format_wrong_s3_credentials(redis_server, s3_server):
    bucket = unique_bucket()
    env = dict(s3_server.env, AWS_SECRET_ACCESS_KEY="wrong-secret-0123456789")
    r = run_cli("format", redis_server.url(redis_server.new_db()), "vol", "--storage", "s3",
                "--bucket", s3_server.bucket_url(bucket), env=env, timeout=FAIL_FAST)
    assert_clean_error(r, r"credential|access|secret|signature|denied|forbidden|auth|403",
                       secrets_=["wrong-secret-0123456789"])
    assert not s3_server.bucket_exists(bucket)


def test_format_wrong_s3_access_key(redis_server, s3_server):
    bucket = unique_bucket()
    env = dict(s3_server.env, AWS_ACCESS_KEY_ID="NOSUCHKEY")
    r = run_cli("format", redis_server.url(redis_server.new_db()), "vol", "--storage", "s3",
                "--bucket", s3_server.bucket_url(bucket), env=env, timeout=FAIL_FAST)
    assert_clean_error(r, r"credential|access|key|signature|denied|forbidden|auth|403",
                       secrets_=[s3_server.secret_key])


def test_format_s3_endpoint_not_answering(redis_server, s3_server):
    port = free_port()
    meta = redis_server.url(redis_server.new_db())
    r = run_cli("format", meta, "vol", "--storage", "s3", "--bucket",
                f"http://127.0.0.1:{port}/{unique_bucket()}", env=s3_server.env,
                timeout=FAIL_FAST)
    assert_clean_error(r, rf"connect|refused|unreachable|endpoint|reach|timed? ?out|{port}")
    # nothing was formatted: status still says so
    assert run_cli("status", meta, timeout=FAIL_FAST).returncode != 0


def test_mount_bucket_deleted_after_format(make_volume, s3_server, mounts):
    vol = make_volume("s3")
    s3_server.delete_bucket(vol.bucket)
    mp = new_dir("mnt")
    r = expect_mount_failure(mounts, ["mount", vol.meta_url, mp, "--cache-dir", new_dir("cache")],
                             mp, env=vol.env)
    assert_clean_error(r, r"bucket|not exist|not found|no such|missing", strict=False)
    assert not is_mounted(mp)


def test_mount_point_does_not_exist(make_volume, mounts, tmp_dir):
    vol = make_volume("file")
    mp = tmp_dir / "no" / "such" / "dir"
    r = expect_mount_failure(mounts, ["mount", vol.meta_url, mp, "--cache-dir", new_dir("cache")],
                             mp, env=vol.env)
    assert_clean_error(r, r"not exist|no such|not a directory|mount ?point|" + re.escape(str(mp)),
                       strict=False)
    assert not mp.exists()


def test_mount_point_already_mounted(make_volume, mount_volume, mounts):
    vol = make_volume("file")
    m = mount_volume(vol)
    (m.path / "before").write_bytes(b"first mount")
    r = expect_mount_failure(mounts, ["mount", vol.meta_url, m.path,
                                      "--cache-dir", new_dir("cache")], m.path, env=vol.env)
    assert_clean_error(r, r"already|mounted|busy|in use", strict=False)
    # the first mount is untouched and still serves
    assert m.alive
    assert (m.path / "before").read_bytes() == b"first mount"
    (m.path / "after").write_bytes(b"still here")
    assert (m.path / "after").read_bytes() == b"still here"
    m.umount()
    assert not is_mounted(m.path)


def test_umount_not_mounted(tmp_dir):
    r = run_cli("umount", tmp_dir, timeout=FAIL_FAST)
    assert_clean_error(r, r"not mounted|not a mount|mount")


# ---------------------------------------------------------------------------
# format and status

def test_format_creates_missing_bucket(redis_server, s3_server):
    bucket = unique_bucket()
    assert not s3_server.bucket_exists(bucket)
    r = assert_ok(run_cli("format", redis_server.url(redis_server.new_db()), "vol",
                          "--storage", "s3", "--bucket", s3_server.bucket_url(bucket),
                          env=s3_server.env))
    out = r.stdout + r.stderr
    assert re.search(r"creat", out, re.I) and bucket in out, \
        "format should say that it created the bucket\n" + describe(r)
    assert s3_server.secret_key not in out
    assert s3_server.bucket_exists(bucket)


def test_format_file_store(make_volume):
    vol = make_volume("file")
    assert os.path.isdir(vol.bucket)
    r = assert_ok(run_cli("status", vol.meta_url, env=vol.env))
    assert vol.name in r.stdout


def test_format_refuses_existing_volume_without_force(make_volume):
    vol = make_volume("s3", name="first")
    again = ["format", vol.meta_url, "second", "--storage", "s3", "--bucket", vol.bucket_url]
    r = run_cli(*again, env=vol.env)
    assert_clean_error(r, r"already|exist|force|formatted")
    status = assert_ok(run_cli("status", vol.meta_url, env=vol.env)).stdout
    assert "first" in status and "second" not in status
    assert_ok(run_cli(*again, "--force", env=vol.env))
    status = assert_ok(run_cli("status", vol.meta_url, env=vol.env)).stdout
    assert "second" in status


def test_format_options(make_volume):
    vol = make_volume("file", block_size="4M", capacity=10, inodes=1000)
    r = assert_ok(run_cli("status", vol.meta_url, env=vol.env))
    assert vol.name in r.stdout


def test_status_masks_secret_and_lists_sessions(make_volume, mount_volume, s3_server):
    vol = make_volume("s3")
    r = assert_ok(run_cli("status", vol.meta_url, env=vol.env))
    out = r.stdout + r.stderr
    assert s3_server.secret_key not in out, "status shows the S3 secret key\n" + describe(r)
    assert vol.name in out and vol.bucket in out
    m = mount_volume(vol)
    r = assert_ok(run_cli("status", vol.meta_url, env=vol.env))
    out = r.stdout + r.stderr
    assert s3_server.secret_key not in out
    assert str(m.path) in out, "status should list the mounted session\n" + describe(r)
    m.umount()
    wait_for(lambda: str(m.path) not in assert_ok(run_cli("status", vol.meta_url,
                                                          env=vol.env)).stdout,
             timeout=10, what="the session to leave status after umount")


# ---------------------------------------------------------------------------
# mount and umount

def test_mount_daemon_returns_once_mounted(make_volume, mounts):
    """mount -d returns once mounted; umount returns once the daemon has
    exited, after uploading what write-back staged, so that a mount with the
    same cache dir can follow at once."""
    vol = make_volume("s3")
    mp = new_dir("mnt")
    cache = new_dir("cache")
    log = new_dir("log") / "daemon.log"
    mounts.track_mountpoint(mp)
    args = ("mount", vol.meta_url, mp, "--cache-dir", cache, "-d", "--log", log)
    assert_ok(run_cli(*args, "--writeback", env=vol.env, timeout=60))
    assert is_mounted(mp) and os.path.ismount(mp), "mount -d returned before mounting"
    (mp / "hello").write_bytes(b"hello -d")
    assert (mp / "hello").read_bytes() == b"hello -d"
    for i in range(20):  # staged, held back by write-back while the burst goes on
        (mp / f"f{i}").write_bytes(os.urandom(100_000))
    assert pids_with_arg(str(mp), also="jfscache"), "no daemon serving the mount point"
    assert log.exists(), "--log FILE was not created"
    assert_ok(run_cli("umount", mp, env=vol.env))
    assert not is_mounted(mp)
    assert not pids_with_arg(str(mp), also="jfscache"), "umount returned while the daemon still ran"
    assert_ok(run_cli(*args, env=vol.env, timeout=60))  # the same cache dir, at once
    assert (mp / "f19").stat().st_size == 100_000
    assert_ok(run_cli("umount", mp, "--no-wait", env=vol.env))
    wait_for(lambda: not pids_with_arg(str(mp), also="jfscache"), timeout=20,
             what="the daemon to exit after umount --no-wait")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_and_unmounts(sig, make_volume, mount_volume):
    vol = make_volume("s3")
    m = mount_volume(vol)
    data = os.urandom(5 * MiB + 12345)
    (m.path / "big").write_bytes(data)          # written and closed, never fsync'd
    (m.path / "small").write_bytes(b"tiny")
    (m.path / "dir").mkdir()
    (m.path / "dir" / "nested").write_bytes(b"nested")
    m.send_signal(sig)
    m.wait_exit(30)                             # exit 0, unmounted
    m.remount(clear_cache=True)                 # reads come from S3
    assert (m.path / "big").read_bytes() == data
    assert (m.path / "small").read_bytes() == b"tiny"
    assert (m.path / "dir" / "nested").read_bytes() == b"nested"
    m.umount()


def test_embedded_default_mount(mounts, tmp_dir):
    home = tmp_dir / "home"
    state = tmp_dir / "state"
    home.mkdir()
    state.mkdir()
    env = dict(os.environ, HOME=str(home), XDG_STATE_HOME=str(state))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    mp = new_dir("mnt")
    m = mounts.start(["mount", str(mp)], mp, env)
    payload = os.urandom(3 * MiB + 7)
    (mp / "data").write_bytes(payload)
    (mp / "sub").mkdir()
    (mp / "sub" / "note").write_text("embedded")
    m.umount()
    assert any(state.rglob("*")), f"nothing was kept under XDG_STATE_HOME={state}"
    m.start()
    assert (mp / "data").read_bytes() == payload
    assert (mp / "sub" / "note").read_text() == "embedded"
    m.umount()
    # the private redis-server went away with the daemon
    wait_for(lambda: not _redis_pids_under(tmp_dir), timeout=10,
             what="the embedded redis-server to stop after umount")


def test_embedded_redis_of_killed_mount(mounts, tmp_dir):
    """SIGKILL leaves the embedded volume's redis-server running. The next
    mount reuses it and now also stops it at its unmount (it used to run on
    for good); fsync'd data survives."""
    env = dict(os.environ, HOME=str(tmp_dir), XDG_STATE_HOME=str(tmp_dir / "state"))
    mp = new_dir("mnt")
    m = mounts.start(["mount", str(mp)], mp, env)
    with open(mp / "kept", "wb") as f:
        f.write(b"fsynced")
        os.fsync(f.fileno())
    m.kill()
    left = _redis_pids_under(tmp_dir)
    assert len(left) == 1, left   # the killed mount's redis-server
    m.start()   # (finds the stale mount and unmounts it first)
    assert (mp / "kept").read_bytes() == b"fsynced"
    assert _redis_pids_under(tmp_dir) == left   # reused
    m.umount()
    wait_for(lambda: not _redis_pids_under(tmp_dir), timeout=10,
             what="the adopted redis-server to stop after umount")


def _redis_pids_under(root: Path) -> list[int]:
    """Live redis-server processes whose cwd or command line is under root."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if not f.read().strip().startswith("redis-server"):
                    continue
            with open(f"/proc/{d}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            continue
        if str(root) in cwd or str(root) in cmd:
            pids.append(int(d))
    return pids


def test_volume_from_a_newer_format_is_refused(make_volume, redis_server):
    """A volume whose settings carry a newer format version is not misread."""
    import json
    vol = make_volume("file")
    db = int(vol.meta_url.rsplit("/", 1)[1])
    r = redis_server.client(db)
    settings = json.loads(r.get("setting"))
    settings["format_version"] = 99
    r.set("setting", json.dumps(settings))
    res = run_cli("status", vol.meta_url, env=vol.env)
    assert_clean_error(res, r"newer jfscache")


@pytest.mark.parametrize("opt,value", [("--max-uploads", "0"), ("--free-space-ratio", "2"),
                                       ("--prefetch", "-1"), ("--attr-timeout", "-1"),
                                       ("--entry-timeout", "-0.5"), ("--read-ahead-kb", "-5")])
def test_mount_option_out_of_range(opt, value, make_volume, mounts):
    """Out-of-range options are refused before anything starts: --max-uploads 0
    used to hang the first close forever, --free-space-ratio 2 evicted the
    whole cache, negative timeouts and readahead were taken as given."""
    vol = make_volume("file")
    mp = new_dir("mnt")
    r = expect_mount_failure(mounts, ["mount", vol.meta_url, mp, opt, value], mp, env=vol.env)
    assert_clean_error(r, rf"{opt}.*{re.escape(value)}.*range")
    assert not is_mounted(mp)


def test_redis_url_with_bad_database(redis_server):
    r = run_cli("status", f"redis://127.0.0.1:{redis_server.port}/abc", timeout=FAIL_FAST)
    assert_clean_error(r, r"database 'abc' is not a number")


def test_format_file_store_with_url_bucket(redis_server, tmp_dir):
    """A URL given to the (default) file storage is a mistake, not a directory
    named 'http:' under the current directory."""
    url = redis_server.url(redis_server.new_db())
    r = run_cli("format", url, "vol", "--bucket", "http://127.0.0.1:9/bkt", cwd=tmp_dir, timeout=FAIL_FAST)
    assert_clean_error(r, r"--storage s3")
    assert list(tmp_dir.iterdir()) == []


def test_embedded_volume_mounted_twice_is_refused(mounts, tmp_dir):
    """A second mount of the embedded volume would share its private Redis
    (and stop it when it unmounts) and its cache dir."""
    env = dict(os.environ, HOME=str(tmp_dir), XDG_STATE_HOME=str(tmp_dir / "state"))
    mp1, mp2 = new_dir("mnt"), new_dir("mnt")
    m = mounts.start(["mount", str(mp1)], mp1, env)
    r = expect_mount_failure(mounts, ["mount", mp2], mp2, env=env)
    assert_clean_error(r, rf"embedded volume .* in use by the jfscache mount at {re.escape(str(mp1))}")
    (mp1 / "still-works").write_bytes(b"yes")
    assert (mp1 / "still-works").read_bytes() == b"yes"
    m.umount()


def test_cache_dir_shared_by_two_daemons_is_refused(make_volume, mount_volume, mounts, tmp_dir):
    cache = tmp_dir / "cache"
    m = mount_volume(make_volume("file"), cache_dir=cache)
    vol2 = make_volume("file")
    mp = new_dir("mnt")
    r = expect_mount_failure(mounts, ["mount", vol2.meta_url, mp, "--cache-dir", cache], mp, env=vol2.env)
    assert_clean_error(r, rf"cache dir {re.escape(str(cache))} is in use by pid {m.proc.pid}", strict=False)


@pytest.mark.parametrize("args,pattern", [
    (["status", "notaurl"], r"invalid Redis URL 'notaurl': it must start with redis://"),
    (["status", "http://127.0.0.1:1/1"], r"invalid Redis URL 'http://"),
    (["format", "redis://127.0.0.1:1/1", "vol", "--block-size", "3M"], r"--block-size must be a power of two"),
    (["mount", "redis://127.0.0.1:1/1", "/tmp", "--cache-size", "-1G"], r"not a size: '-1G'"),
    (["mount", "redis://127.0.0.1:1/1", "/etc/passwd"], r"/etc/passwd does not exist or is not a directory"),
    (["mount", "redis://127.0.0.1:1/1", "/nonexistent/mnt"], r"/nonexistent/mnt does not exist or is not a dir"),
    (["mount", "redis://127.0.0.1:1/1", "/proc"], r"/proc is already a mount point \(unmount it first"),
    (["mount", "redis://127.0.0.1:1/1", "/tmp", "--cache-dir", "/sys/jfscache"],
     r"cache dir /sys/jfscache is unusable: Operation not permitted \(choose another --cache-dir"),
    (["mount", "--bogus", "x", "y"], r"No such option '--bogus'.*jfscache mount --help"),
    (["bogus"], r"No such command 'bogus'"),
])
def test_bad_input_gets_one_line(args, pattern):
    """Malformed URLs, an invalid block size, a negative size, a mount point
    that is a file, missing or already mounted, a cache dir that cannot be
    made, an unknown option or command: one line, no traceback."""
    assert_clean_error(run_cli(*args, timeout=FAIL_FAST), pattern)
