"""The workloads. Each step is a function (target, ctx) -> dict of metrics,
run on one mounted target; steps run in order and may depend on files an
earlier step left (see STEPS). Units: MB = 10^6 bytes, MiB = 2^20 bytes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .services import BenchError
from .targets import Target, read_ahead_kb

MiB = 1 << 20
MB = 1e6


@dataclass
class Config:
    size_mib: int = 1024          # the big sequential file
    meta_files: int = 10_000      # files in the metadata workload
    small_files: int = 2_000      # 64 KiB files
    small_kib: int = 64
    readers: int = 4              # parallel readers of the small files
    rand4k_ops: int = 50_000      # random reads: at most this many ...
    rand128k_ops: int = 8_000
    rand_seconds: float = 20.0    # ... or this long
    dl_workers: int = 4
    dl_batch: int = 32
    seed: int = 1


@dataclass
class Ctx:
    cfg: Config
    run: int
    python: str                      # interpreter for helper subprocesses
    can_drop: bool = True
    notes: list[str] = field(default_factory=list)

    def rundir(self, t: Target) -> Path:
        return t.mountpoint / f"run{self.run}"

    def bigfile(self, t: Target) -> Path:
        return self.rundir(t) / "big.bin"

    def smalldir(self, t: Target) -> Path:
        return self.rundir(t) / "small"


# ---------------------------------------------------------------------------
# helpers


def drop_caches() -> bool:
    """Drop the kernel page cache, dentries and inodes (needs root). Files the
    workloads wrote were fsync'ed, so no sync is needed (and a sync could hang
    on a misbehaving FUSE daemon)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _random_buffer(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_sequential(path: Path, bs: int = MiB) -> tuple[int, float]:
    """Read the whole file with bs-sized read() calls into one buffer."""
    mv = memoryview(bytearray(bs))
    t0 = time.perf_counter()
    total = read_into(path, mv)
    return total, time.perf_counter() - t0


def read_into(path, mv: memoryview) -> int:
    """Read a whole file through one reusable buffer; returns the bytes read."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [mv])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


class RssSampler:
    """Peak RSS of a process while a workload runs: polls VmRSS and reads
    VmHWM (the kernel's own high-water mark since the process started)."""

    def __init__(self, pid: int | None, tree: list[int] | None = None, interval: float = 0.02) -> None:
        self.pid = pid
        self.tree = tree or ([pid] if pid else [])
        self.interval = interval
        self.peak_kb = 0
        self.tree_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _status(self, pid: int | None = None) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{pid or self.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        k, v = line.split(":", 1)
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._status().get("VmRSS", 0))
            if len(self.tree) > 1:
                total = sum(self._status(p).get("VmRSS", 0) for p in self.tree)
                self.tree_peak_kb = max(self.tree_peak_kb, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pid:
            self._stop.set()
            self._thread.join()
            st = self._status()
            self.peak_kb = max(self.peak_kb, st.get("VmRSS", 0))
            self.hwm_kb = st.get("VmHWM", 0)

    def result(self, prefix: str) -> dict:
        if not self.pid:
            return {}
        out = {f"{prefix}_rss_peak_MiB": round(self.peak_kb / 1024, 1),
               f"{prefix}_rss_hwm_MiB": round(getattr(self, "hwm_kb", 0) / 1024, 1),
               f"{prefix}_daemon_pid": self.pid, f"{prefix}_daemon_processes": len(self.tree)}
        if len(self.tree) > 1:
            out[f"{prefix}_tree_rss_peak_MiB"] = round(self.tree_peak_kb / 1024, 1)
        return out


def _need(path: Path, size: int | None = None) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BenchError(f"prerequisite missing: {path}: {e}") from e
    if size is not None and st.st_size != size:
        raise BenchError(f"prerequisite {path} has {st.st_size} bytes, expected {size}")


def _drop(ctx: Ctx) -> None:
    ctx.can_drop = drop_caches() and ctx.can_drop


# ---------------------------------------------------------------------------
# big file: write, cold/warm/page-cache reads, random reads


def seq_write(t: Target, ctx: Ctx) -> dict:
    size = ctx.cfg.size_mib * MiB
    rd = ctx.rundir(t)
    rd.mkdir(exist_ok=True)
    buf = _random_buffer(MiB, ctx.cfg.seed)
    path = ctx.bigfile(t)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            if os.write(fd, buf) != MiB:
                raise BenchError("short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    return {"seq_write_MBps": size / dt / MB, "seq_write_s": dt}


def _big_read(t: Target, ctx: Ctx, prefix: str) -> dict:
    size = ctx.cfg.size_mib * MiB
    path = ctx.bigfile(t)
    _need(path, size)
    with RssSampler(t.daemon_pid(), t.daemon_tree()) as rss:
        n, dt = read_sequential(path)
    if n != size:
        raise BenchError(f"read {n} bytes of {size}")
    out = {f"{prefix}_MBps": n / dt / MB, f"{prefix}_s": dt}
    out.update(rss.result(prefix))
    return out


def cold_read(t: Target, ctx: Ctx) -> dict:
    """Remount with an empty cache, drop the page cache: every block from S3."""
    t.remount(clean_cache=True)
    _drop(ctx)
    out = {"cold_read_readahead_kb": read_ahead_kb(t.mountpoint)}
    out.update(_big_read(t, ctx, "cold_read"))
    out["cache_bytes_after_cold_read"] = t.wait_cache_settled()
    # how much of the file one cold read left in the disk cache (a daemon may
    # drop blocks it cannot write fast enough; index files count too)
    out["cold_read_cache_fill_pct"] = min(100.0, 100.0 * out["cache_bytes_after_cold_read"]
                                          / (ctx.cfg.size_mib * MiB))
    st = t.stats()
    if st:
        out["stats_after_cold_read"] = st
    return out


def fill_cache(t: Target, ctx: Ctx, want_bytes: int, read_all, max_passes: int = 4) -> tuple[int, float]:
    """Untimed extra passes (remount keeping the cache, drop_caches, read
    everything) until the disk cache holds want_bytes: a daemon may skip
    caching blocks while it reads fast (JuiceFS drops cache writes when its
    queue is full), and a warm read should then still measure the disk tier
    only. Returns (passes, percent of want_bytes cached)."""
    passes = 0
    have = t.cache_bytes()
    while have < 0.995 * want_bytes and passes < max_passes:
        t.remount(clean_cache=False)
        _drop(ctx)
        read_all()
        have = t.wait_cache_settled()
        passes += 1
    return passes, 100.0 * have / want_bytes


def warm_read(t: Target, ctx: Ctx) -> dict:
    """Remount keeping the disk cache, drop the page cache: blocks from the
    local disk cache (a fresh daemon, so nothing in its memory)."""
    size = ctx.cfg.size_mib * MiB
    passes, pct = fill_cache(t, ctx, size, lambda: read_sequential(ctx.bigfile(t)))
    t.remount(clean_cache=False)
    cached = t.cache_bytes()
    _drop(ctx)
    out = _big_read(t, ctx, "warm_read")
    out["cache_bytes_before_warm_read"] = cached
    out["warm_read_fill_passes"] = passes
    out["warm_read_cache_pct"] = pct
    st = t.stats()
    if st:
        out["stats_after_warm_read"] = st
    return out


def pagecache_read(t: Target, ctx: Ctx) -> dict:
    """Read again without dropping anything. The other target's steps run in
    between and drop the page cache (drop_caches is machine-wide), so one
    untimed pass first brings the file back into it."""
    read_sequential(ctx.bigfile(t))
    return _big_read(t, ctx, "pagecache_read")


def _random_reads(t: Target, ctx: Ctx, bs: int, max_ops: int, key: str) -> dict:
    size = ctx.cfg.size_mib * MiB
    path = ctx.bigfile(t)
    _need(path, size)
    # a fresh daemon, its disk cache kept: what is measured is the disk tier
    # (plus whatever the daemon itself loads), not leftovers of earlier steps
    t.remount(clean_cache=False)
    _drop(ctx)
    nblocks = size // bs
    # the same offsets for every target in a run; without replacement, so no
    # read is served by the page cache a previous one filled
    rng = random.Random(ctx.cfg.seed * 1000 + ctx.run * 10 + bs)
    offsets = [i * bs for i in rng.sample(range(nblocks), min(max_ops, nblocks))]
    buf = bytearray(bs)
    fd = os.open(path, os.O_RDONLY)
    ops = 0
    try:
        deadline = time.perf_counter() + ctx.cfg.rand_seconds
        t0 = time.perf_counter()
        for off in offsets:
            if os.preadv(fd, [buf], off) != bs:
                raise BenchError(f"short read at {off}")
            ops += 1
            if (ops & 63) == 0 and time.perf_counter() > deadline:
                break
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {f"{key}_iops": ops / dt, f"{key}_MBps": ops * bs / dt / MB, f"{key}_ops": ops,
            f"{key}_s": dt}


def rand_read_4k(t: Target, ctx: Ctx) -> dict:
    return _random_reads(t, ctx, 4096, ctx.cfg.rand4k_ops, "rand4k")


def rand_read_128k(t: Target, ctx: Ctx) -> dict:
    return _random_reads(t, ctx, 128 * 1024, ctx.cfg.rand128k_ops, "rand128k")


# ---------------------------------------------------------------------------
# metadata


def metadata(t: Target, ctx: Ctx) -> dict:
    """create, stat, list, rename, unlink N empty files in one directory."""
    n = ctx.cfg.meta_files
    rd = ctx.rundir(t)
    rd.mkdir(exist_ok=True)
    d = rd / "meta"
    d.mkdir()
    names = [str(d / f"f{i:06d}") for i in range(n)]
    renamed = [str(d / f"g{i:06d}") for i in range(n)]
    out = {}

    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    out["meta_create_ops"] = n / (time.perf_counter() - t0)

    # the kernel caches entries/attributes for ~1 s: drop them so that stat
    # asks the daemon (lookup + getattr), as it does for files not seen lately
    _drop(ctx)
    t0 = time.perf_counter()
    for p in names:
        os.stat(p)
    out["meta_stat_ops"] = n / (time.perf_counter() - t0)

    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        listed = os.listdir(d)
    out["meta_list_entries_per_s"] = reps * n / (time.perf_counter() - t0)
    if len(listed) != n:
        raise BenchError(f"listdir returned {len(listed)} entries, expected {n}")

    # `ls -l` as users first look at a data set (statx plus two xattr
    # queries per file), after the kernel caches are dropped, then again.
    for key, drop in (("meta_lsl_cold_entries_per_s", True), ("meta_lsl_warm_entries_per_s", False)):
        if drop:
            _drop(ctx)
        t0 = time.perf_counter()
        subprocess.run(["ls", "-l", str(d)], stdout=subprocess.DEVNULL, check=True)
        out[key] = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for a, b in zip(names, renamed):
        os.rename(a, b)
    out["meta_rename_ops"] = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for p in renamed:
        os.unlink(p)
    out["meta_unlink_ops"] = n / (time.perf_counter() - t0)
    os.rmdir(d)
    return out


# ---------------------------------------------------------------------------
# many small files


def _small_names(t: Target, ctx: Ctx) -> list[Path]:
    d = ctx.smalldir(t)
    return [d / f"s{i:05d}.bin" for i in range(ctx.cfg.small_files)]


def small_write(t: Target, ctx: Ctx) -> dict:
    size = ctx.cfg.small_kib * 1024
    rd = ctx.rundir(t)
    rd.mkdir(exist_ok=True)
    ctx.smalldir(t).mkdir()
    names = _small_names(t, ctx)
    dt = _write_files(names, size, ctx.cfg.seed + 7)
    return {"small_write_files_per_s": len(names) / dt, "small_write_MBps": len(names) * size / dt / MB}


def _write_files(paths: list[Path], size: int, seed: int) -> float:
    """Create each file with `size` bytes and fsync it, one after another;
    the seconds it took."""
    base = _random_buffer(MiB + size, seed)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        off = (i * 4099) % MiB
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, base[off:off + size])
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# What each target runs for the write-back row: jfscache's --writeback (fsync
# returns once blocks are durable on the cache disk), JuiceFS CE as users run
# it (it uploads at fsync); the comparison.
WRITEBACK_ARGS = {"jfscache": ["--writeback"], "juicefs": []}


def small_write_writeback(t: Target, ctx: Ctx) -> dict:
    """The small-file write again, into a fresh directory, with the target
    remounted in write-back mode (see WRITEBACK_ARGS); remounted as before after."""
    extra = WRITEBACK_ARGS.get(t.name, [])
    t.extra_mount_args += extra
    try:
        t.remount(clean_cache=False)
        d = ctx.rundir(t) / "small-wb"
        d.mkdir()
        dt = _write_files([d / f"w{i:05d}.bin" for i in range(ctx.cfg.small_files)],
                          ctx.cfg.small_kib * 1024, ctx.cfg.seed + 8)
    finally:
        del t.extra_mount_args[len(t.extra_mount_args) - len(extra):]
    t.remount(clean_cache=False)  # (waits for the uploads: the unmount drains them)
    return {"small_write_wb_files_per_s": ctx.cfg.small_files / dt,
            "small_write_wb_args": " ".join(extra) or "(default)"}


def _parallel_read(names: list[Path], readers: int, size: int) -> tuple[int, float]:
    def work(part: list[Path]) -> int:
        mv = memoryview(bytearray(size + 4096))
        return sum(read_into(p, mv) for p in part)

    parts = [names[i::readers] for i in range(readers)]
    with ThreadPoolExecutor(readers) as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(work, parts))
        dt = time.perf_counter() - t0
    return total, dt


def _small_read(t: Target, ctx: Ctx, key: str) -> dict:
    names = _small_names(t, ctx)
    size = ctx.cfg.small_kib * 1024
    _need(names[-1], size)
    _drop(ctx)
    total, dt = _parallel_read(names, ctx.cfg.readers, size)
    if total != len(names) * size:
        raise BenchError(f"read {total} bytes, expected {len(names) * size}")
    return {f"{key}_files_per_s": len(names) / dt, f"{key}_MBps": total / dt / MB}


def small_read_cold(t: Target, ctx: Ctx) -> dict:
    t.remount(clean_cache=True)
    out = _small_read(t, ctx, "small_read_cold")
    out["cache_bytes_after_small_cold"] = t.wait_cache_settled()
    out["small_read_cold_cache_fill_pct"] = min(100.0, 100.0 * out["cache_bytes_after_small_cold"]
                                                / (ctx.cfg.small_files * ctx.cfg.small_kib * 1024))
    return out


def small_read_warm(t: Target, ctx: Ctx) -> dict:
    names = _small_names(t, ctx)
    size = ctx.cfg.small_kib * 1024
    passes, pct = fill_cache(t, ctx, len(names) * size,
                             lambda: _parallel_read(names, ctx.cfg.readers, size))
    t.remount(clean_cache=False)
    out = _small_read(t, ctx, "small_read_warm")
    out["small_read_warm_fill_passes"] = passes
    out["small_read_warm_cache_pct"] = pct
    return out


# ---------------------------------------------------------------------------
# PyTorch DataLoader epoch (in a subprocess, so torch's import is not timed)


def torch_available(python: str) -> bool:
    cp = subprocess.run([python, "-c", "import torch"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    return cp.returncode == 0


def dataloader_epoch(t: Target, ctx: Ctx) -> dict:
    """One epoch over the small files, 4 workers, warm disk cache (remounted,
    page cache dropped)."""
    names = _small_names(t, ctx)
    _need(names[-1], ctx.cfg.small_kib * 1024)
    t.remount(clean_cache=False)
    _drop(ctx)
    argv = [ctx.python, "-m", "bench.dl_epoch", str(ctx.smalldir(t)),
            "--workers", str(ctx.cfg.dl_workers), "--batch-size", str(ctx.cfg.dl_batch),
            "--seed", str(ctx.cfg.seed + ctx.run)]
    cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=str(Path(__file__).resolve().parent.parent), timeout=3600)
    if cp.returncode != 0:
        raise BenchError(f"dl_epoch failed ({cp.returncode}): {cp.stderr[-2000:]}")
    r = json.loads(cp.stdout.strip().splitlines()[-1])
    if r["files"] != len(names):
        raise BenchError(f"DataLoader saw {r['files']} files, expected {len(names)}")
    return {"dataloader_files_per_s": r["files"] / r["seconds"],
            "dataloader_MBps": r["bytes"] / r["seconds"] / MB, "dataloader_s": r["seconds"]}


def cleanup_run(t: Target, ctx: Ctx) -> dict:
    """Remove what this run wrote (not timed)."""
    import shutil
    rd = ctx.rundir(t)
    if rd.exists():
        shutil.rmtree(rd)
    return {}


# ---------------------------------------------------------------------------
# the plan

@dataclass
class Step:
    name: str
    fn: object
    group: str
    requires: tuple[str, ...] = ()
    timed: bool = True


STEPS = [
    Step("seq_write", seq_write, "seq"),
    Step("cold_read", cold_read, "seq", ("seq_write",)),
    Step("warm_read", warm_read, "seq", ("seq_write", "cold_read")),
    Step("pagecache_read", pagecache_read, "seq", ("seq_write",)),
    Step("rand_read_4k", rand_read_4k, "rand", ("seq_write",)),
    Step("rand_read_128k", rand_read_128k, "rand", ("seq_write",)),
    Step("metadata", metadata, "meta"),
    Step("small_write", small_write, "small"),
    Step("small_read_cold", small_read_cold, "small", ("small_write",)),
    Step("small_read_warm", small_read_warm, "small", ("small_write",)),
    Step("small_write_wb", small_write_writeback, "small"),
    Step("dataloader", dataloader_epoch, "dataloader", ("small_write",)),
    Step("cleanup", cleanup_run, "cleanup", timed=False),
]
GROUPS = ["seq", "rand", "meta", "small", "dataloader", "nullfs"]


# ---------------------------------------------------------------------------
# the ceiling: a null pyfuse3 filesystem


def nullfs_ceiling(procs, workdir: Path, ctx: Ctx) -> dict:
    """Sequential 1 MiB reads from bench/nullfs.py: default readahead, then
    read_ahead_kb raised to 1024, then a direct_io file."""
    from .targets import bdi_path, force_unmount, is_mounted

    mp = workdir / "nullfs-mnt"
    mp.mkdir(exist_ok=True)
    size = ctx.cfg.size_mib * MiB
    proc = procs.start("nullfs", [ctx.python, "-m", "bench.nullfs", str(mp),
                                  "--size-mib", str(ctx.cfg.size_mib)], stop_timeout=10)
    out: dict = {}
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            if not proc.alive() or time.monotonic() > deadline:
                raise BenchError(f"nullfs did not mount:\n{proc.log_tail()}")
            time.sleep(0.05)
        bdi = bdi_path(mp)
        ra_file = bdi / "read_ahead_kb" if bdi else None
        default_ra = int(ra_file.read_text()) if ra_file else None
        out["nullfs_default_readahead_kb"] = default_ra
        # warm the daemon up (first requests after a mount are slower)
        fd = os.open(mp / "data_direct", os.O_RDONLY)
        buf = bytearray(MiB)
        for i in range(64):
            os.preadv(fd, [buf], i * MiB)
        os.close(fd)

        def one(name: str) -> float:
            _drop(ctx)
            n, dt = read_sequential(mp / name)
            if n != size:
                raise BenchError(f"nullfs read {n} of {size}")
            return n / dt / MB

        out["nullfs_default_ra_MBps"] = one("data")
        if ra_file is not None:
            try:
                ra_file.write_text("1024\n")
                out["nullfs_ra1024_MBps"] = one("data")
            finally:
                try:
                    ra_file.write_text(f"{default_ra}\n")
                except OSError:
                    pass
        out["nullfs_direct_io_MBps"] = one("data_direct")
    finally:
        proc.stop()
        if is_mounted(mp):
            force_unmount(mp)
    return out
