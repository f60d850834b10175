"""The embedded default: a private redis-server on a unix socket and a local
directory store under a state directory, so `jfscache mount MOUNTPOINT` works
with no configuration at all.

Why a local-directory store and not a spawned S3 server: it needs no second
server (SeaweedFS takes ~10 s to start), keeps blocks as plain files, and the
data path above the store is the same; S3 is what the tests exercise.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


def _lock(state: str, owner: str) -> int:
    from .fsutil import hold_lock
    os.makedirs(state, mode=0o700, exist_ok=True)
    return hold_lock(os.path.join(state, "mount.lock"), f"the embedded volume in {state}", owner)


def lock_state(state: str, mountpoint: str) -> None:
    """One daemon per embedded volume: a second would share its private
    redis-server (and stop it at its own unmount) and its cache directory.
    The lock is held until this process exits."""
    _lock(state, f"the jfscache mount at {mountpoint} (pid {os.getpid()}); unmount it first, "
                 "or set XDG_STATE_HOME for a second embedded volume")


def exists(state: str) -> bool:
    """Formatted once: the format made its block directory."""
    return os.path.isdir(os.path.join(state, "blocks"))


@contextlib.contextmanager
def redis_for_command(state: str, command: str):
    """The URL of the embedded volume's redis-server for one command (status,
    fsck, gc): the mount's while it is mounted, else one started for the
    command and stopped after it. The command holds the mount lock
    meanwhile, so a mount starting then cannot take over a redis-server the
    command is about to stop."""
    from .fsutil import Busy
    try:
        fd = _lock(state, f"a 'jfscache {command}' command (pid {os.getpid()}); wait until it has finished")
    except Busy:
        fd = None
    if fd is None:
        yield _mounts_redis(state)
        return
    try:
        url, proc = start_redis(state)
        try:
            yield url
        finally:
            stop_redis(proc)
    finally:
        os.close(fd)


def _mounts_redis(state: str) -> str:
    """The URL of the redis-server of the mount that holds the lock, once it
    answers (a mount starting starts it first)."""
    sock = os.path.join(state, "redis.sock")
    deadline = time.monotonic() + 10
    while not _answers(sock):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the embedded volume in {state} is mounted, but its redis-server ({sock}) "
                               "does not answer")
        time.sleep(0.1)
    return _url(sock)


def _url(sock: str) -> str:
    return f"unix://{sock}?db=0"


class _Leftover:
    """A redis-server that a killed mount left running. The caller holds the
    volume's lock, so nothing else uses it: it is adopted and stopped like
    one started here (before, it ran on after every later unmount)."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 0
        return None

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("redis-server", timeout)
            time.sleep(0.05)
        return 0


def _server_pid(sock: str) -> int | None:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(sock)
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def start_redis(state: str) -> tuple[str, subprocess.Popen | _Leftover | None]:
    """A redis-server private to this state dir. Returns its URL and the
    process to stop afterwards: one started here, or one a killed mount left
    running (adopted; None if its pid cannot be told). The caller holds the
    volume's lock."""
    os.makedirs(state, mode=0o700, exist_ok=True)
    sock = os.path.join(state, "redis.sock")
    if len(os.fsencode(sock)) > 107:
        raise RuntimeError(f"the embedded volume's Redis socket {sock} is longer than a unix socket path "
                           "may be (107 bytes); set XDG_STATE_HOME to a shorter directory")
    url = _url(sock)
    if _answers(sock):
        pid = _server_pid(sock)
        return url, (_Leftover(pid) if pid else None)
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


def stop_redis(proc: subprocess.Popen | _Leftover | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()  # redis fsyncs its append-only file on SIGTERM
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
