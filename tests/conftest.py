"""Shared fixtures: private redis-server and SeaweedFS S3 servers (once per
session, on free ports), formatted volumes, mounted daemons, and `mnt`, a
fresh directory on a mounted volume for POSIX tests.

Set JFSCACHE_TEST_DIR=/some/dir to run `mnt`-based tests against a plain
directory (a kernel file system) instead: no servers start, and tests that
need a jfscache mount of their own are skipped.

Other knobs: JFSCACHE_TEST_TIMEOUT (seconds per test, default 300; past it
the watchdog kills the daemons so a hung mount fails the test instead of the
run), JFSCACHE_KEEP_TMP=1 (keep /tmp/jfscache-tests-* for post-mortems).
"""
from __future__ import annotations

import faulthandler
import os
import re
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import helpers  # noqa: E402
from helpers import (  # noqa: E402
    Mount,
    MountManager,
    RedisServer,
    SeaweedS3,
    Volume,
    new_dir,
    python_as_nobody,
    run_as_nobody,
)

PLAIN_DIR = os.environ.get("JFSCACHE_TEST_DIR") or None


def needs_mount():
    """Skip the calling test when running against a plain directory."""
    if PLAIN_DIR:
        pytest.skip("needs a jfscache mount (JFSCACHE_TEST_DIR is set)")


# --------------------------------------------------------------------------
# reports, so teardown can show daemon logs of failed tests

@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def _failed(request) -> bool:
    node = request.node
    return any(getattr(getattr(node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


# --------------------------------------------------------------------------
# session plumbing

@pytest.fixture(scope="session", autouse=True)
def _session_base():
    """Owns /tmp/jfscache-tests-*: torn down last, after every mount and
    server is gone."""
    yield helpers.session_base()
    helpers.kill_all_mounts("session end")
    helpers.remove_base()


@pytest.fixture(autouse=True)
def _watchdog(request):
    """A per-test deadline (pytest has no timeout without a plugin): dump
    the stacks and kill the daemons, which makes syscalls blocked on their
    mounts fail with ENOTCONN, so the test fails instead of hanging CI."""
    timeout = float(os.environ.get("JFSCACHE_TEST_TIMEOUT", "300"))
    done = threading.Event()
    fired = threading.Event()

    def fire():
        if done.wait(timeout):
            return
        fired.set()
        print(f"\n*** watchdog: {request.node.nodeid} still running after {timeout:.0f}s",
              file=sys.__stderr__)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        helpers.kill_all_mounts("watchdog")

    t = threading.Thread(target=fire, name="watchdog", daemon=True)
    t.start()
    yield
    done.set()
    if fired.is_set():
        pytest.fail(f"watchdog: the test ran longer than {timeout:.0f}s "
                    f"(JFSCACHE_TEST_TIMEOUT); its daemons were killed", pytrace=False)


# --------------------------------------------------------------------------
# servers

def _running(kind, name: str):
    """Start a server of `kind` in a fresh dir for the session (failing the
    test with its log if it does not come up), yield it, stop it."""
    if PLAIN_DIR:
        pytest.skip("servers are not started when JFSCACHE_TEST_DIR is set")
    server = kind(new_dir(name))
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """A private redis-server: `.url(db)`, `.new_db()`, `.port`, `.client(db)`."""
    yield from _running(RedisServer, "redis")


@pytest.fixture(scope="session")
def s3_server() -> SeaweedS3:
    """SeaweedFS with its S3 gateway: `.endpoint`, `.access_key`,
    `.secret_key`, `.env`, `.bucket_url(name)`, `.client()` (boto3),
    `.bucket_exists(name)`, `.delete_bucket(name)`."""
    yield from _running(SeaweedS3, "seaweedfs")


# --------------------------------------------------------------------------
# volumes and mounts

@pytest.fixture
def make_volume(request, redis_server):
    """make_volume(storage="s3"|"file", name=None, **format_args) -> Volume
    (meta_url, name, bucket_url, env, storage, bucket, format_output).
    format_args become flags: block_size="4M" -> --block-size 4M,
    force=True -> --force. Asserts that format succeeded."""
    def make(storage: str = "s3", name: str | None = None, **format_args) -> Volume:
        s3 = request.getfixturevalue("s3_server") if storage == "s3" else None
        return helpers.make_volume(redis_server, s3, storage, name, **format_args)
    return make


@pytest.fixture
def mounts(request):
    """The MountManager behind mount_volume: `.start(args, mountpoint, env,
    cache_dir=None)` for raw `jfscache ARGS` mounts, `.track_mountpoint(p)`
    for mounts made some other way (-d). Everything is cleaned up."""
    if PLAIN_DIR:
        pytest.skip("needs jfscache mounts (JFSCACHE_TEST_DIR is set)")
    mgr = MountManager()
    yield mgr
    if _failed(request):
        mgr.dump_logs()
    mgr.cleanup()


@pytest.fixture
def mount_volume(mounts):
    """mount_volume(volume, mountpoint=None, *extra_args, cache_dir=None,
    env=None) -> Mount (path, proc, log_path, cache_dir; .umount(),
    .kill(sig=SIGKILL), .remount(clear_cache=False), .log_tail()).
    Runs `jfscache mount META_URL MP --cache-dir DIR EXTRA...` in the
    foreground and waits until MP is mounted."""
    return mounts.mount


@pytest.fixture
def tmp_dir(request) -> Path:
    """A fresh directory (mode 0755) under the session base, traversable
    by nobody (unlike tmp_path)."""
    return new_dir(request.node.name)


# --------------------------------------------------------------------------
# mnt: one mounted S3 volume per test module, a fresh directory per test

class _MntRoot(SimpleNamespace):
    path: Path
    mount: Mount | None
    volume: Volume | None


@pytest.fixture(scope="module")
def _mnt_root(request):
    if PLAIN_DIR:
        base = Path(PLAIN_DIR)
        base.mkdir(parents=True, exist_ok=True)
        mod = re.sub(r"[^A-Za-z0-9_]+", "_", request.module.__name__)
        root = new_dir(f"{mod}-{os.getpid()}", mode=0o755, parent=base)
        yield _MntRoot(path=root, mount=None, volume=None)
        import shutil
        shutil.rmtree(root, ignore_errors=True)
        return
    redis = request.getfixturevalue("redis_server")
    s3 = request.getfixturevalue("s3_server")
    volume = helpers.make_volume(redis, s3, "s3")
    mgr = MountManager()
    try:
        m = mgr.mount(volume)
        yield _MntRoot(path=m.path, mount=m, volume=volume)
        if m.alive:
            m.umount()   # a module's clean unmount is checked, too
    finally:
        mgr.cleanup()


@pytest.fixture
def mnt(request, _mnt_root) -> Path:
    """A fresh, empty directory (mode 0777) on this module's mounted S3
    volume (or under JFSCACHE_TEST_DIR)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    d = new_dir(name, mode=0o777, parent=_mnt_root.path)
    os.chmod(d, 0o777)   # whatever the umask
    yield d
    if _failed(request) and _mnt_root.mount is not None:
        m = _mnt_root.mount
        print(f"\n----- {m.path} daemon log tail ({m.log_path}) -----\n{m.log_tail(60)}")


@pytest.fixture
def mnt_mount(_mnt_root) -> Mount | None:
    """The Mount behind `mnt` (None under JFSCACHE_TEST_DIR), e.g. for
    `mnt_mount.remount(clear_cache=True)`; `mnt` paths stay valid."""
    return _mnt_root.mount


@pytest.fixture
def mnt_volume(_mnt_root) -> Volume | None:
    """The Volume behind `mnt` (None under JFSCACHE_TEST_DIR)."""
    return _mnt_root.volume


# --------------------------------------------------------------------------
# running as nobody

@pytest.fixture
def own_servers():
    """For tests that start, stop or break their own servers and mounts:
    they cannot run against a plain directory (JFSCACHE_TEST_DIR)."""
    if os.environ.get("JFSCACHE_TEST_DIR"):
        pytest.skip("needs its own servers and mounts (JFSCACHE_TEST_DIR is set)")


@pytest.fixture
def as_nobody():
    """as_nobody.run(argv, **subprocess_kw) and as_nobody.python(code,
    *argv, cwd="/") run as uid/gid 65534 with no supplementary groups and
    return a CompletedProcess with text stdout/stderr. The snippet runs
    under a system Python (stdlib only): the venv's lives under /root."""
    return SimpleNamespace(run=run_as_nobody, python=python_as_nobody,
                           uid=helpers.NOBODY_UID, gid=helpers.NOBODY_GID)
