"""Processes the bench starts: Redis, SeaweedFS (S3), FUSE daemons.

Everything is started through :class:`Procs`, which remembers each child by
PID and stops it (SIGTERM, then SIGKILL) at the end, in reverse order, also
after an exception or Ctrl-C. Children run in their own session so a Ctrl-C
in the terminal reaches only the harness, which then unmounts before it stops
the servers the mounts depend on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# ports


_handed_out: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1, below the ephemeral range, never reused
    within this process (SeaweedFS and others derive nothing from it since
    every port is passed explicitly)."""
    for _ in range(1000):
        port = random.randint(20000, 32000)
        if port not in _handed_out and _port_free(port):
            _handed_out.add(port)
            return port
    raise BenchError("no free port found")


def wait_tcp(port: int, timeout: float, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode} before listening "
                             f"on {port}:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# --------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 20.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float | None = None) -> None:
        if not self.alive():
            return
        timeout = self.stop_timeout if timeout is None else timeout
        try:
            os.kill(self.pid, self.stop_signal)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class Procs:
    logdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict | None = None,
              cwd: str | None = None, stop_timeout: float = 20.0) -> Proc:
        log = self.logdir / f"{name}.log"
        fh = open(log, "ab")
        fh.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full_env, cwd=cwd, start_new_session=True)
        fh.close()
        p = Proc(name, popen, log, stop_timeout=stop_timeout)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                print(f"[bench] stopping {p.name} (pid {p.pid}) failed: {e}")
        self.procs.clear()


def run(argv: list[str], timeout: float = 120, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {cp.returncode}:\n{cp.stdout[-3000:]}")
    return cp


# --------------------------------------------------------------------------
# Redis


class Redis:
    def __init__(self, procs: Procs, workdir: Path) -> None:
        self.procs = procs
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = self.dir / "redis.sock"  # also served: `bench.run --redis-unix`
        self.unix = False  # url() names the socket instead of the TCP port
        self.proc: Proc | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir), "--databases", "64", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
        self.proc = self.procs.start("redis", argv, stop_timeout=10)
        wait_tcp(self.port, 20, self.proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.1)
        raise BenchError("redis does not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def url(self, db: int) -> str:
        # The same form for both targets: JuiceFS reads unix://PATH?db=N too.
        return f"unix://{self.socket}?db={db}" if self.unix else f"redis://127.0.0.1:{self.port}/{db}"

    def version(self) -> str:
        cp = run(["redis-server", "--version"], check=False)
        return cp.stdout.strip()


# --------------------------------------------------------------------------
# SeaweedFS with an S3 gateway


class SeaweedS3:
    ACCESS_KEY = "benchaccess"
    SECRET_KEY = "benchsecret0123456789"

    def __init__(self, procs: Procs, workdir: Path, weed: str) -> None:
        self.procs = procs
        self.weed = weed
        self.dir = workdir / "seaweedfs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in (
            "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
            "s3", "s3_grpc")}
        self.proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def bucket_url(self, bucket: str) -> str:
        return f"{self.endpoint}/{bucket}"

    def start(self, buckets: list[str], timeout: float = 90) -> None:
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "bench",
            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, indent=1))
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        argv = [self.weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
                f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock",
                "-volume.max=200", "-master.volumeSizeLimitMB=256", "-volume.preStopSeconds=0",
                "-master.telemetry=false"]
        self.proc = self.procs.start("seaweedfs", argv, stop_timeout=30)
        wait_tcp(p["s3"], timeout, self.proc)
        # S3 listens before the volume server has registered: retry until a
        # bucket can be created and an object written into it.
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        client = self.client()
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise BenchError(f"seaweedfs exited:\n{self.proc.log_tail()}")
            try:
                for b in buckets:
                    try:
                        client.create_bucket(Bucket=b)
                    except client.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    except client.exceptions.BucketAlreadyExists:
                        pass
                    client.put_object(Bucket=b, Key="bench-probe", Body=b"x" * 1024)
                    client.delete_object(Bucket=b, Key="bench-probe")
                return
            except Exception as e:  # noqa: BLE001 - any S3 error means "not yet"
                last = e
                time.sleep(0.5)
        raise BenchError(f"SeaweedFS S3 not usable after {timeout:.0f} s: {last}")

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.ACCESS_KEY,
                            aws_secret_access_key=self.SECRET_KEY,
                            config=Config(retries={"max_attempts": 1},
                                          s3={"addressing_style": "path"}))

    def bucket_bytes(self, bucket: str) -> int:
        total = 0
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def version(self) -> str:
        cp = run([self.weed, "version"], check=False)
        return cp.stdout.strip().splitlines()[0] if cp.stdout.strip() else "?"
