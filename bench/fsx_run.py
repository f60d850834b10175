"""A long fsx run (tests/fsx.py) against a real jfscache mount of an S3 volume.

    .venv/bin/python bench/fsx_run.py [--ops 200000] [--remount-every 20000] [--seed 1]
                                      [--max-minutes M] [--out bench/out/fsx.json]

Starts its own redis-server and SeaweedFS S3 server the way the tests do
(tests/helpers.py), formats a volume, mounts it, and runs the exerciser on
one file, remounting with an empty cache every --remount-every ops (the file
is verified whole after each remount). With --max-minutes the run stops at
the next op past that time (the figure says how many ops ran). Prints the
summary (ops per kind, mismatches, errors, peak daemon RSS = the largest
VmHWM of the mount daemons, wall time) and writes it to --out. On a mismatch
the complete op log is written next to it (fsx-oplog.json) for a replay:

    python tests/fsx.py MOUNTED_DIR --replay bench/out/fsx-oplog.json

Everything started is stopped and unmounted at the end, also on errors.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


helpers = _load("helpers")
fsx = _load("fsx")


def vm_hwm_kib(pid: int | None) -> int:
    """Peak resident set (VmHWM, KiB) of a process; 0 if unknown."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _source() -> dict:
    """Which jfscache the daemons run: the import path of `python -m
    jfscache.cli` started from here, and the commit (of a git checkout, or
    a COMMIT file in a snapshot made with `git archive`)."""
    r = subprocess.run([sys.executable, "-c", "import jfscache; print(jfscache.__file__)"],
                       capture_output=True, text=True)
    info = {"jfscache": r.stdout.strip()}
    commit_file = ROOT / "COMMIT"
    if commit_file.exists():
        info["commit"] = commit_file.read_text().strip() + " (snapshot)"
    else:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--",
                                "jfscache"]).returncode
        info["commit"] = r.stdout.strip() + (" + uncommitted changes in jfscache/" if dirty else "")
    return info


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    # SIGTERM, and SIGINT even when started in the background (where it is
    # ignored), stop the run through the clean-up below
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200000)
    ap.add_argument("--remount-every", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", default="default", choices=sorted(fsx.PROFILES))
    ap.add_argument("--max-minutes", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--progress", type=int, default=2000, help="a progress line every N ops")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "fsx.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, cache) afterwards")
    a = ap.parse_args()
    os.environ.setdefault("JFSCACHE_TEST_TMP", "/tmp")
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    base = helpers.session_base()
    redis = helpers.RedisServer(helpers.new_dir("redis"))
    s3 = helpers.SeaweedS3(helpers.new_dir("seaweedfs"))
    mgr = helpers.MountManager()
    result: dict = {"ops_requested": a.ops, "remount_every": a.remount_every, "seed": a.seed,
                    "profile": a.profile, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **_source()}
    peak = {"kib": 0, "per_daemon": []}
    remount_times: list[dict] = []
    t0 = time.monotonic()
    runner = None
    m = None
    rc = 1

    def sample() -> None:
        if m is not None and m.alive:
            k = vm_hwm_kib(m.pid)
            peak["kib"] = max(peak["kib"], k)
            return k
        return 0

    try:
        redis.start()
        s3.start()
        vol = helpers.make_volume(redis, s3, "s3")
        m = mgr.mount(vol)
        result["mount_args"] = m.args
        deadline = t0 + a.max_minutes * 60 if a.max_minutes else None

        def remount() -> None:
            peak["per_daemon"].append(sample())
            t = [time.monotonic()]
            m.umount()                 # as m.remount(clear_cache=True), in timed steps
            t.append(time.monotonic())
            m.clear_cache()
            t.append(time.monotonic())
            m.start()
            t.append(time.monotonic())
            steps = {k: round(t[i + 1] - t[i], 1) for i, k in enumerate(("umount", "clear_cache", "mount"))}
            remount_times.append(steps)
            print(f"[fsx_run] remounted with an empty cache in {t[-1] - t[0]:.1f} s {steps} "
                  f"(previous daemon's VmHWM {peak['per_daemon'][-1] / 1024:.0f} MiB)", flush=True)

        runner = fsx.Fsx(m.path / "fsx.bin", a.seed, profile=a.profile, remount=remount,
                         remount_every=a.remount_every, progress_every=a.progress, name="fsx_run")
        runner.t0 = time.monotonic()
        runner.open(create=True)
        stopped_early = False
        for _ in range(a.ops):
            runner.step()
            if runner.remount_every and runner.n % runner.remount_every == 0:
                runner._remount()
            if runner.n % a.progress == 0:
                sample()
                dt = time.monotonic() - runner.t0
                print(f"[fsx_run] {runner.n} ops, {runner.n / dt:.0f} ops/s, size "
                      f"{len(runner.model) / 2**20:.1f} MiB, written {runner.bytes_written / 2**30:.2f} GiB, "
                      f"read {runner.bytes_read / 2**30:.2f} GiB, daemon VmHWM {peak['kib'] / 1024:.0f} MiB",
                      flush=True)
            if deadline and time.monotonic() > deadline:
                stopped_early = True
                break
        runner.verify_all(drop=True)
        runner.counts["verify"] += 1
        runner.close()
        # a last check from the object store: remount with an empty cache, verify once more
        remount()
        runner.open(create=False)
        runner.verify_all()
        runner.close()
        result.update(runner.summary())
        result["stopped_early_at_time_limit"] = stopped_early
        rc = 0
    except fsx.FsxError as e:
        print(e, file=sys.stderr)
        result["failure"] = str(e)
        result["mismatches" if isinstance(e, fsx.Mismatch) else "errors"] = 1
        if runner is not None:
            log = out_path.with_name("fsx-oplog.json")
            runner.dump_log(log)
            result["oplog"] = str(log)
    except Exception as e:  # noqa: BLE001  (the harness: report it, clean up)
        traceback.print_exc()
        result["failure"] = f"{type(e).__name__}: {e}"
        result["errors"] = 1
    except KeyboardInterrupt as e:
        print(f"[fsx_run] interrupted ({e}): cleaning up", flush=True)
        result["failure"] = f"interrupted: {e}"
        result["interrupted"] = True
    finally:
        sample()
        if runner is not None:
            try:
                runner.close()
            except OSError:
                pass
            if "per_kind" not in result:
                s = runner.summary()
                s.pop("mismatches"), s.pop("errors")
                result.update(s)
        if m is not None:
            result["daemon_log_tail"] = m.log_tail(30) if rc else ""
            if m.alive:
                try:
                    m.umount()
                except AssertionError as e:
                    result.setdefault("errors", 1)
                    result["umount_failure"] = str(e)[-2000:]
        mgr.cleanup()
        redis.stop()
        s3.stop()
        if not a.keep:
            helpers.remove_base()
        else:
            print(f"[fsx_run] kept {base}")
    result.setdefault("mismatches", 0)
    result.setdefault("errors", 0)
    result["peak_daemon_rss_mib"] = round(peak["kib"] / 1024, 1)
    result["daemon_vmhwm_mib_per_mount"] = [round(k / 1024, 1) for k in peak["per_daemon"]]
    result["remount_seconds"] = remount_times
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("ops", "per_kind", "mismatches", "errors", "remounts", "bytes_written", "bytes_read",
            "peak_daemon_rss_mib", "wall_seconds", "seconds", "seconds_per_kind")
    print(json.dumps({k: result.get(k) for k in keys}, indent=1))
    print(f"[fsx_run] summary written to {out_path}")
    return 1 if result["mismatches"] or result["errors"] or result.get("interrupted") else rc


if __name__ == "__main__":
    sys.exit(main())
