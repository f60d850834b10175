"""The embedded default: a private redis-server on a unix socket and a local
directory store under a state directory, so `jfscache mount MOUNTPOINT` works
with no configuration at all.

Why a local-directory store and not a spawned S3 server: it needs no second
server (SeaweedFS takes ~10 s to start), keeps blocks as plain files, and the
data path above the store is the same; S3 is what the tests exercise.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

STATE_NAME = "jfscache"
VOLUME = "jfscache"


def state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, STATE_NAME)


def _answers(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(sock)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def lock_state(state: str, mountpoint: str) -> None:
    """One daemon per embedded volume: a second would share its private
    redis-server (and stop it at its own unmount) and its cache directory.
    The lock is held until this process exits."""
    from .fsutil import hold_lock
    os.makedirs(state, mode=0o700, exist_ok=True)
    hold_lock(os.path.join(state, "mount.lock"), f"the embedded volume in {state}",
              f"the jfscache mount at {mountpoint} (pid {os.getpid()}); unmount it first, "
              "or set XDG_STATE_HOME for a second embedded volume")


def start_redis(state: str) -> tuple[str, subprocess.Popen | None]:
    """A redis-server private to this state dir (reused if one already runs).
    Returns its URL and the process we started (None if reused)."""
    os.makedirs(state, mode=0o700, exist_ok=True)
    sock = os.path.join(state, "redis.sock")
    url = f"unix://{sock}?db=0"
    if _answers(sock):
        return url, None
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server), and the embedded default needs it")
    # appendfsync everysec: at most one second of metadata lost on a power cut,
    # the same trade-off as a local filesystem's journal commit interval.
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--dir", state,
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
         "--logfile", os.path.join(state, "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _answers(sock):
            return url, proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the private redis-server did not start; see {os.path.join(state, 'redis.log')}")


def default_settings(state: str) -> dict:
    from .meta.engine import volume_settings
    return volume_settings(VOLUME, "file", "file://" + os.path.join(state, "blocks"))


def stop_redis(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()  # redis fsyncs its append-only file on SIGTERM
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
