"""Plain helpers behind tests/conftest.py's fixtures: servers (redis-server,
SeaweedFS), volumes, mounts of the daemon, and running things as nobody.

Everything here is usable without pytest fixtures (module-scoped fixtures
and tests that need their own lifecycle call it directly), and nothing here
ever touches a FUSE file system to clean up: teardown goes by
/proc/self/mountinfo, signals and `fusermount3 -u -z`, so a hung daemon
cannot hang the suite.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from jfscache import fsutil

MiB = 1 << 20
NOBODY_UID = 65534
NOBODY_GID = 65534

#: how the tests run the daemon's command line (works before the console
#: script is refreshed)
JFSCACHE = [sys.executable, "-m", "jfscache.cli"]

VENV_BIN = Path(sys.executable).parent


def _which(name: str) -> str:
    """A binary from the venv first (weed), then PATH."""
    cand = VENV_BIN / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (run .ci/setup)")
    return found


# --------------------------------------------------------------------------
# temp dirs, traversable by nobody

_BASE: Path | None = None
_BASE_LOCK = threading.Lock()
_counter = itertools.count(1)


def session_base() -> Path:
    """The session's base directory under /tmp, mode 0755 (pytest's tmp_path
    parents are 0700, which nobody cannot traverse)."""
    global _BASE
    with _BASE_LOCK:
        if _BASE is None:
            root = os.environ.get("JFSCACHE_TEST_TMP") or tempfile.gettempdir()
            # canonical once, so later checks need no realpath()
            _BASE = Path(os.path.realpath(tempfile.mkdtemp(prefix="jfscache-tests-", dir=root)))
            os.chmod(_BASE, 0o755)
        return _BASE


def new_dir(prefix: str, mode: int = 0o755, parent: Path | None = None) -> Path:
    """A fresh directory under the session base (or `parent`)."""
    parent = parent or session_base()
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix)[:60]
    d = parent / f"{prefix}-{next(_counter)}"
    d.mkdir()
    os.chmod(d, mode)
    return d


def remove_base() -> None:
    """Remove the session base, unless something is still mounted under it
    (never recurse into a mount) or JFSCACHE_KEEP_TMP is set."""
    if _BASE is None or not _BASE.exists():
        return
    if os.environ.get("JFSCACHE_KEEP_TMP"):
        print(f"\nkeeping test files in {_BASE}", file=sys.__stderr__)
        return
    for mp in mounts_under(_BASE):
        lazy_unmount(mp)
    if mounts_under(_BASE):
        print(f"\nnot removing {_BASE}: still mounted under it", file=sys.__stderr__)
        return
    shutil.rmtree(_BASE, ignore_errors=True)


# --------------------------------------------------------------------------
# ports

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(offsets: Iterable[int] = (0,), lo: int = 12000, hi: int = 22000) -> int:
    """A port P such that P+o is free on 127.0.0.1 for every o in offsets
    (SeaweedFS listens on port+10000 for gRPC, and names a unix socket
    /tmp/seaweedfs-*-grpc-<port+10000>.sock). Ports are never handed out
    twice in one session. Nothing listens on it afterwards, so it also
    serves as a "closed port". The range keeps P+10000 below Linux's
    ephemeral ports (32768+), so outgoing connections cannot grab them."""
    offsets = tuple(offsets)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with _port_lock:
        for _ in range(2000):
            p = rng.randrange(lo, hi)
            ports = [p + o for o in offsets]
            if any(q in _handed_out or q > 65535 for q in ports):
                continue
            if any(Path(f"/tmp/seaweedfs-{k}-grpc-{q}.sock").exists()
                   for q in ports for k in ("master", "volume", "filer", "s3")):
                continue
            if all(_bindable(q) for q in ports):
                _handed_out.update(ports)
                return p
    raise RuntimeError("no free port found")


# --------------------------------------------------------------------------
# processes

def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(data.splitlines()[-lines:])


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn: the child gets `sig` when the test process dies (a
    killed pytest leaves no servers or daemons behind). The kernel sends it
    when the *thread* that forked exits, so only from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        libc.prctl(1, int(sig), 0, 0, 0)   # PR_SET_PDEATHSIG
    return preexec


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
    """Send `sig`, wait up to `grace` seconds, then SIGKILL; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def pids_with_arg(arg: str, also: str | None = None) -> list[int]:
    """Pids of live processes whose command line has `arg` as one argument
    (and contains `also` somewhere, if given)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        args = [a.decode("utf-8", "replace") for a in argv]
        if arg in args and (also is None or any(also in a for a in args)):
            found.append(int(d))
    return found


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition"):
    """Poll `pred` until it returns something truthy (OSError counts as
    false) and return that; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            val = pred()
            if val:
                return val
            last = val
        except OSError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def call_with_timeout(fn: Callable, timeout: float, default=None):
    """Run fn in a daemon thread (it may touch a FUSE mount that hangs)."""
    box: list = []

    def run():
        try:
            box.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001
            box.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        return default
    kind, val = box[0]
    if kind == "err":
        raise val
    return val


# --------------------------------------------------------------------------
# mounts, from /proc/self/mountinfo (never stat()s the mount itself)

mountinfo = fsutil.mountinfo  # (mount point, major:minor, fs type) of every mount


# Only os.path.abspath here: realpath() would lstat the mount point, which
# blocks forever on a hung (e.g. SIGSTOPped) daemon.

def is_mounted(path: str | Path) -> bool:
    path = os.path.abspath(path)
    return any(mp == path for mp, _, _ in mountinfo())


def mounts_under(base: str | Path) -> list[str]:
    base = os.path.abspath(base)
    return [mp for mp, _, _ in mountinfo() if mp == base or mp.startswith(base + "/")]


def abort_fuse(path: str | Path) -> None:
    """Abort the FUSE connection of a mount (unblocks anything stuck in it)."""
    path = os.path.abspath(path)
    for mp, dev, fstype in mountinfo():
        if mp == path and fstype.startswith("fuse"):
            minor = dev.split(":")[1]
            with contextlib.suppress(OSError):
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")


def lazy_unmount(path: str | Path) -> None:
    path = str(path)
    for _ in range(5):  # a mount point can be stacked
        if not is_mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=30)
        if r.returncode != 0 and is_mounted(path):
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


# --------------------------------------------------------------------------
# the command line

def run_cli(*args, env: dict | None = None, timeout: float = 60, cwd=None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `jfscache ARGS...` to completion and return the CompletedProcess
    (text stdout/stderr). A command that outlives `timeout` fails the test."""
    cmd = [*JFSCACHE, *map(str, args)]
    try:
        return subprocess.run(cmd, env=env, timeout=timeout, cwd=cwd, text=True,
                              capture_output=True,
                              stdin=subprocess.DEVNULL if input is None else None,
                              input=input)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")
        err = (e.stderr or b"")
        if isinstance(out, bytes):
            out = out.decode("utf-8", "replace")
        if isinstance(err, bytes):
            err = err.decode("utf-8", "replace")
        raise AssertionError(
            f"`jfscache {' '.join(map(str, args))}` did not finish within {timeout}s\n"
            f"stdout:\n{out}\nstderr:\n{err}") from None


def describe(r: subprocess.CompletedProcess) -> str:
    return (f"command: {' '.join(map(str, r.args))}\nexit: {r.returncode}\n"
            f"--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}")


def assert_ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, "command failed\n" + describe(r)
    assert "Traceback" not in r.stdout + r.stderr, "traceback in output\n" + describe(r)
    return r


def assert_clean_error(r: subprocess.CompletedProcess, pattern: str | None = None,
                       *, strict: bool = True, secrets_: Iterable[str] = ()) -> str:
    """The contract for bad input: non-zero exit, no Python traceback, and
    one clear line on stderr (`strict`; otherwise the last non-empty stderr
    line is taken as the error, for a foreground mount that may have logged
    before failing). `pattern` (a regex, case-insensitive) must match that
    line. Returns the line."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, "expected a failure\n" + describe(r)
    assert "Traceback" not in out, "Python traceback in the output\n" + describe(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr\n" + describe(r)
    if strict:
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n" + describe(r)
    line = lines[-1]
    if pattern:
        assert re.search(pattern, line, re.I), \
            f"error line does not match /{pattern}/: {line!r}\n" + describe(r)
    for s in secrets_:
        assert s not in out, f"a secret ({s[:3]}...) appears in the output\n" + describe(r)
    return line


# --------------------------------------------------------------------------
# redis-server

def make_certs(d: Path) -> Path:
    """Test TLS files in d: a CA (ca.pem), a certificate for 127.0.0.1 that
    it signed (server.pem, server.key), and a self-signed one that it did
    not (other.pem, other.key)."""
    def openssl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=jfscache test CA",
            "-keyout", d / "ca.key", "-out", d / "ca.pem")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", d / "server.key", "-out", d / "server.csr")
    openssl("x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", d / "ext.cnf", "-out", d / "server.pem")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other CA",
            "-keyout", d / "other.key", "-out", d / "other.pem")
    return d


class RedisServer:
    """A private redis-server on a free port of 127.0.0.1, 1024 databases."""

    def __init__(self, workdir: Path, persistent: bool = False):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.persistent = persistent   # append-only file, fsync always: survives restart()
        self.log_path = workdir / "redis.log"
        self._dbs = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = _which("redis-server")
        last = ""
        keep = self.port != 0   # restart(): the same port, as clients know it
        for _ in range(1 if keep else 3):
            self.port = self.port if keep else free_port()
            cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.workdir), "--save", "",
                   *(["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                     else ["--appendonly", "no"]),
                   "--databases", "1024", "--protected-mode", "no", "--daemonize", "no",
                   "--logfile", str(self.log_path), "--unixsocket", ""]
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._ping():
                    return self
                time.sleep(0.05)
            stop_process(self.proc, signal.SIGKILL)
            last = log_tail(self.log_path)
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"redis-server did not start (port {self.port}); log tail:\n{last}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def new_db(self) -> int:
        """A database number never handed out before in this session."""
        with self._lock:
            n = next(self._dbs)
        if n >= 1024:
            raise RuntimeError("out of redis databases (1024)")
        return n

    def client(self, db: int = 0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, grace=5)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port."""
        self.stop()
        self.start()


# --------------------------------------------------------------------------
# SeaweedFS (S3)

class SeaweedS3:
    """`weed server ... -s3` on free ports of 127.0.0.1 with one identity
    (all actions), so wrong credentials are refused."""

    access_key = "jfscachetestkey"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.secret_key = "jfs-" + secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = workdir / "weed.log"
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                            "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                            "AWS_SHARED_CREDENTIALS_FILE")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
        return env

    def bucket_url(self, name: str) -> str:
        return f"{self.endpoint}/{name}"

    def _config(self) -> Path:
        cfg = {"identities": [{
            "name": "jfscache-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(cfg, indent=1))
        os.chmod(path, 0o600)
        return path

    def start(self, timeout: float = 45.0) -> "SeaweedS3":
        weed = _which("weed")
        cfg = self._config()
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        last = ""
        for _ in range(3):
            t0 = time.monotonic()
            self.ports = {k: free_port((0, 10000)) for k in ("master", "volume", "filer", "s3", "metrics")}
            cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={self.ports['master']}",
                   f"-volume.port={self.ports['volume']}",
                   f"-filer.port={self.ports['filer']}",
                   "-s3", f"-s3.port={self.ports['s3']}", f"-s3.config={cfg}",
                   "-volume.max=2000", "-master.volumeSizeLimitMB=256",   # every bucket takes 7 volumes at once
                   f"-metricsPort={self.ports['metrics']}",   # S3-side request counts for tests
                   # no network here; the defaults would phone home and
                   # listen on fixed ports 8181 and 9101
                   "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   "-volume.preStopSeconds=0",
                   f"-filer.localSocket={self.workdir / 'filer.sock'}",
                   f"-s3.localSocket={self.workdir / 's3.sock'}"]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True,
                                             preexec_fn=die_with_parent())
            err = self._wait_ready(t0 + timeout)
            if err is None:
                self.start_seconds = time.monotonic() - t0
                return self
            self._kill()
            last = f"{err}\nlog tail:\n{log_tail(self.log_path)}"
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"SeaweedFS did not start: {last}")

    def requests(self, bucket: str, kind: str = "GET") -> int:
        """Requests of one kind that the S3 gateway answered for a bucket,
        from its own metrics: what the store really served, whatever the
        daemons' counters say."""
        import urllib.request
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line
                   and f'type="{kind}"' in line)

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"max_attempts": 2, "mode": "standard"},
                          connect_timeout=5, read_timeout=30,
                          s3={"addressing_style": "path"}))

    def _wait_ready(self, deadline: float) -> str | None:
        """Ready = a bucket can be created and written (the S3 gateway
        answers before the volume server has registered with the master)."""
        c = None
        bucket = "jfs-ready-probe"
        err = "timed out"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"weed exited with {self.proc.returncode}"
            try:
                if c is None:
                    c = self.client()
                with contextlib.suppress(Exception):
                    c.create_bucket(Bucket=bucket)
                c.put_object(Bucket=bucket, Key="probe", Body=b"x" * 1024)
                assert c.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"x" * 1024
                c.delete_object(Bucket=bucket, Key="probe")
                c.delete_bucket(Bucket=bucket)
                return None
            except Exception as e:  # noqa: BLE001  (not up yet)
                err = f"{type(e).__name__}: {e}"
                time.sleep(0.2)
        return err

    def bucket_exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError
        try:
            self.client().head_bucket(Bucket=name)
            return True
        except ClientError:
            return False

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and every object in it."""
        c = self.client()
        paginator = c.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                c.delete_objects(Bucket=name, Delete={"Objects": objs, "Quiet": True})
        c.delete_bucket(Bucket=name)

    def _kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed names unix sockets after its gRPC ports and leaves them behind
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                for name in (f"seaweedfs-{kind}-grpc-{port + 10000}.sock",
                             f"seaweedfs-{kind}-{port}.sock"):
                    with contextlib.suppress(OSError):
                        os.unlink(f"/tmp/{name}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s (its filer waits 15 s for the S3
        gateway's gRPC stream to end, so a graceful stop takes ~16 s; the
        data is disposable)."""
        if self.proc is None:
            return
        t0 = time.monotonic()
        stop_process(self.proc, signal.SIGTERM, grace=5)
        self.stop_seconds = time.monotonic() - t0
        self._remove_sockets()


# --------------------------------------------------------------------------
# volumes

@dataclass
class Volume:
    meta_url: str
    name: str
    bucket_url: str
    env: dict
    storage: str = "s3"
    bucket: str = ""          # the S3 bucket name, or the file store's directory
    format_output: str = ""


_vol_counter = itertools.count(1)
_SESSION_TAG = secrets.token_hex(3)


def unique_bucket() -> str:
    return f"jfs-{_SESSION_TAG}-{next(_vol_counter)}"


def format_args(**opts) -> list[str]:
    """block_size="4M" -> --block-size 4M; force=True -> --force."""
    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        else:
            out += [flag, str(v)]
    return out


def make_volume(redis: RedisServer, s3: SeaweedS3 | None, storage: str = "s3",
                name: str | None = None, *, bucket: str | None = None,
                env: dict | None = None, **fmt) -> Volume:
    """Format a new volume in a new redis db and a new bucket (or store
    directory), asserting that format succeeded."""
    db = redis.new_db()
    meta_url = redis.url(db)
    bucket = bucket or unique_bucket()
    name = name or f"vol{db}"
    if storage == "s3":
        assert s3 is not None, "storage=s3 needs the s3_server fixture"
        bucket_url = s3.bucket_url(bucket)
        env = env or s3.env
    elif storage == "file":
        bucket = str(new_dir("store") / bucket)
        bucket_url = bucket
        env = env or dict(os.environ)
    else:
        raise ValueError(storage)
    r = run_cli("format", meta_url, name, "--storage", storage, "--bucket", bucket_url,
                *format_args(**fmt), env=env, timeout=120)
    assert_ok(r)
    return Volume(meta_url=meta_url, name=name, bucket_url=bucket_url, env=env,
                  storage=storage, bucket=bucket, format_output=r.stdout + r.stderr)


# --------------------------------------------------------------------------
# mounts of the daemon

MOUNT_TIMEOUT = 20.0
_ALL_MOUNTS: "weakref.WeakSet[Mount]" = weakref.WeakSet()


class MountFailed(AssertionError):
    pass


class Mount:
    """A foreground `jfscache mount` process and its mount point."""

    def __init__(self, path: Path, args: list[str], env: dict, log_path: Path,
                 cache_dir: Path | None, volume: Volume | None = None):
        self.path = Path(path)
        self.args = list(args)           # after `jfscache`
        self.env = env
        self.log_path = Path(log_path)
        self.cache_dir = cache_dir
        self.volume = volume
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        _ALL_MOUNTS.add(self)

    def __repr__(self):
        return f"<Mount {self.path} pid={self.proc.pid if self.proc else None}>"

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = MOUNT_TIMEOUT) -> "Mount":
        """Start the daemon and wait until the path is a mount point."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        assert not is_mounted(self.path), f"{self.path} is still mounted"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: jfscache {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([*JFSCACHE, *self.args], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._cleanup_mountpoint()
                raise MountFailed(f"`jfscache {' '.join(self.args)}` exited with {rc} "
                                  f"before mounting; log tail:\n{self.log_tail()}")
            if is_mounted(self.path) and call_with_timeout(
                    lambda: os.path.ismount(self.path), 5, default=False):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise MountFailed(f"{self.path} not mounted within {timeout}s; log tail:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def umount(self, timeout: float = 30) -> None:
        """`jfscache umount MP`, then the daemon must exit 0."""
        r = run_cli("umount", self.path, env=self.env, timeout=timeout)
        assert r.returncode == 0, (f"umount failed\n{describe(r)}\ndaemon log tail:\n"
                                   f"{self.log_tail()}")
        self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the daemon to exit; assert it exited 0 and unmounted."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s; log tail:\n"
                                 f"{self.log_tail()}") from None
        assert rc == 0, f"daemon exited with {rc}; log tail:\n{self.log_tail()}"
        assert not is_mounted(self.path), f"{self.path} still mounted after the daemon exited"
        return rc

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Crash: send `sig` (SIGKILL by default), reap, then lazily unmount
        what the dead daemon left behind."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
        self._cleanup_mountpoint()
        return rc

    def _cleanup_mountpoint(self) -> None:
        if is_mounted(self.path):
            abort_fuse(self.path)
            lazy_unmount(self.path)

    def clear_cache(self) -> None:
        if self.cache_dir is None:
            return
        assert not self.alive, "clear the cache only while unmounted"
        # Blocks still staged for upload are data, not cache: they stay.
        if self.cache_dir.exists():
            for p in self.cache_dir.iterdir():
                if p.name != "staging":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.cache_dir.mkdir(exist_ok=True)
        os.chmod(self.cache_dir, 0o755)

    def remount(self, clear_cache: bool = False, timeout: float = MOUNT_TIMEOUT) -> "Mount":
        """Unmount cleanly if running (a crashed one is just cleaned up),
        optionally empty the cache dir (so reads come from S3), mount again."""
        if self.alive:
            self.umount()
        else:
            self._cleanup_mountpoint()
        if clear_cache:
            self.clear_cache()
        return self.start(timeout)

    def cleanup(self, grace: float = 20) -> None:
        """Teardown: SIGTERM (clean flush + unmount), SIGKILL after `grace`
        seconds, and lazy unmount as a last resort."""
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, signal.SIGTERM, grace=grace)
        self._cleanup_mountpoint()

    # -- logs --------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


class MountManager:
    """Starts mounts and cleans every one of them up."""

    def __init__(self, label: str = "mount"):
        self.label = label
        self.mounts: list[Mount] = []
        self.extra_mountpoints: list[Path] = []   # e.g. mounts made with -d

    def start(self, args: list[str], mountpoint: Path, env: dict,
              cache_dir: Path | None = None, volume: Volume | None = None,
              wait: bool = True) -> Mount:
        log_path = new_dir("log") / "jfscache.log"
        m = Mount(mountpoint, args, env, log_path, cache_dir, volume)
        self.mounts.append(m)
        if wait:
            m.start()
        return m

    def mount(self, volume: Volume, mountpoint: str | Path | None = None, *extra_args,
              cache_dir: str | Path | None = None, env: dict | None = None) -> Mount:
        """`jfscache mount META_URL MP --cache-dir DIR EXTRA...` in the
        foreground; returns once MP is mounted."""
        mp = Path(mountpoint) if mountpoint else new_dir("mnt")
        cache = Path(cache_dir) if cache_dir else new_dir("cache")
        args = ["mount", volume.meta_url, str(mp), "--cache-dir", str(cache),
                *map(str, extra_args)]
        return self.start(args, mp, env or volume.env, cache, volume)

    def track_mountpoint(self, path: str | Path) -> None:
        """Clean up a mount point mounted some other way (`mount -d`)."""
        self.extra_mountpoints.append(Path(path))

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            with contextlib.suppress(Exception):
                m.cleanup()
        for mp in self.extra_mountpoints:
            with contextlib.suppress(Exception):
                kill_daemons_of(mp)
        self.mounts.clear()
        self.extra_mountpoints.clear()

    def dump_logs(self, lines: int = 60) -> None:
        for m in self.mounts:
            print(f"\n----- {m.path} daemon log tail ({m.log_path}) -----\n{m.log_tail(lines)}")


def kill_daemons_of(mountpoint: str | Path, grace: float = 20) -> None:
    """Stop every jfscache process serving `mountpoint` (found by its
    command line) and unmount it."""
    mp = str(mountpoint)
    pids = pids_with_arg(mp, also="jfscache")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if is_mounted(mp):
        abort_fuse(mp)
        lazy_unmount(mp)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def kill_all_mounts(reason: str) -> None:
    """The watchdog's hammer: SIGKILL every daemon the tests started and
    abort their FUSE connections, so a test blocked in a syscall on a hung
    mount gets ENOTCONN and fails instead of hanging the suite."""
    for m in list(_ALL_MOUNTS):
        if not m.alive and not is_mounted(m.path):
            continue
        print(f"{reason}: killing {m!r}", file=sys.__stderr__)
        with contextlib.suppress(Exception):
            abort_fuse(m.path)
        with contextlib.suppress(Exception):
            m.kill()


# --------------------------------------------------------------------------
# running things as nobody

_NOBODY_PYTHON: str | None = None


def run_as_nobody(args: list[str], *, timeout: float = 60, check: bool = False,
                  **kw) -> subprocess.CompletedProcess:
    """Run a command as uid/gid 65534 with no supplementary groups; text
    output captured."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(list(map(str, args)), user=NOBODY_UID, group=NOBODY_GID,
                          extra_groups=[], timeout=timeout, check=check, **kw)


def nobody_python() -> str:
    """A Python interpreter that nobody can execute (the venv's points into
    /root, which is 0700 here): Debian's /usr/bin/python3 usually."""
    global _NOBODY_PYTHON
    if _NOBODY_PYTHON is None:
        cands = ["/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3"),
                 os.path.realpath(sys.executable)]
        for c in cands:
            if c and os.path.exists(c):
                try:
                    r = run_as_nobody([c, "-c", "import os; print(os.getuid())"], timeout=30,
                                      cwd="/")
                except OSError:
                    continue
                if r.returncode == 0 and r.stdout.strip() == str(NOBODY_UID):
                    _NOBODY_PYTHON = c
                    break
        else:
            raise RuntimeError("no Python interpreter executable by nobody")
    return _NOBODY_PYTHON


def python_as_nobody(code: str, *args, cwd: str | Path = "/", timeout: float = 60,
                     check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a Python snippet (stdlib only) as nobody; `args` land in
    sys.argv[1:]. Returns the CompletedProcess (text stdout/stderr)."""
    return run_as_nobody([nobody_python(), "-c", code, *map(str, args)], cwd=cwd,
                         timeout=timeout, check=check, **kw)


# --------------------------------------------------------------------------
# data helpers

def file_sha256(path: str | Path, piece: int = MiB) -> tuple[str, int]:
    """(hex sha256, byte count) of a file, read in `piece`-sized reads."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(piece)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            h.update(mv[:k])
            n += k
    return h.hexdigest(), n


def first_diff(a: bytes | memoryview, b: bytes | memoryview) -> int:
    """Index of the first differing byte (or the shorter length)."""
    n = min(len(a), len(b))
    lo = 0
    step = 1 << 16
    while lo < n:
        hi = min(n, lo + step)
        if a[lo:hi] != b[lo:hi]:
            for i in range(lo, hi):
                if a[i] != b[i]:
                    return i
        lo = hi
    return n


class FsyncWriter:
    """A thread that writes new files into `root` and fsyncs each, while a
    test breaks something (Redis restarts, a failover). `written` holds what
    was acknowledged; an operation may fail only with EIO (a change whose
    reply was lost), and those names go to `failed`. With `verify`, it also
    reads back earlier files as it goes."""

    def __init__(self, root: Path, verify: bool = False):
        self.root, self.verify = Path(root), verify
        self.written: dict[str, bytes] = {}
        self.failed: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                name, data = f"f{i:04d}", os.urandom(50_000 + i * 997 % MiB)
                try:
                    with open(self.root / name, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    self.written[name] = data
                    old = f"f{i // 2:04d}"
                    if self.verify and old in self.written:
                        assert (self.root / old).read_bytes() == self.written[old], f"{old} differs"
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    self.failed.append(name)
                i += 1
        except BaseException as e:  # reported by __exit__ in the test's thread
            self.errors.append(e)

    def __enter__(self) -> "FsyncWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.errors:
            raise self.errors[0]

    def wait_more(self, n: int, timeout: float = 90) -> None:
        target = len(self.written) + n
        wait_for(lambda: len(self.written) >= target or self.errors, timeout=timeout,
                 what=f"{n} more fsync'd files")
