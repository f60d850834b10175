"""Read latency of a file taking many small random writes: flat, because
fragmented chunks are compacted in the background.

    .venv/bin/python -m bench.compact_bench [--writes 20000] [--rounds 10] [--out FILE]

A 12 MiB file gets --writes random 4 KiB pwrite()s (with an fsync every 100,
so every few writes become slices of their own), in rounds; after each round
it reports the chunk's slice count in Redis, the median and p90 latency of
200 random 4 KiB pread()s (page cache dropped for the file first, so the
daemon resolves the chunk), and the time of one sequential read of the whole
file. Without compaction the slice count grows with the writes and so does
the read latency (every read resolves every slice); with it both stay flat.
Runs its own redis-server and a local-directory store, as root.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .services import free_port

KiB, MiB = 1 << 10, 1 << 20


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=12)
    ap.add_argument("--out")
    a = ap.parse_args()
    jfs = [sys.executable, "-m", "jfscache.cli"]
    tmp = tempfile.mkdtemp(prefix="jfs-compact-")
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    mp = os.path.join(tmp, "mnt")
    os.mkdir(mp)
    url = f"redis://127.0.0.1:{port}/1"
    daemon = None
    rows = []
    try:
        _wait(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
              == b"PONG", 10, "redis")
        subprocess.run([*jfs, "format", url, "compact", "--storage", "file", "--bucket",
                        os.path.join(tmp, "store")], check=True, capture_output=True)
        daemon = subprocess.Popen([*jfs, "mount", url, mp, "--cache-dir", os.path.join(tmp, "cache")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: os.path.ismount(mp), 30, "the mount")
        size = a.size_mib * MiB
        path = os.path.join(mp, "db")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        ino = os.stat(path).st_ino
        rng = random.Random(1)
        fd = os.open(path, os.O_RDWR)
        per_round = a.writes // a.rounds
        done = 0
        for rnd in range(a.rounds + 1):
            if rnd:
                t = time.perf_counter()
                for i in range(per_round):
                    os.pwrite(fd, rng.randbytes(4 * KiB), rng.randrange(0, size - 4 * KiB) & ~4095)
                    if i % 100 == 99:
                        os.fsync(fd)
                os.fsync(fd)
                done += per_round
                write_s = time.perf_counter() - t
            else:
                write_s = 0.0
            slices = int(subprocess.run(["redis-cli", "-p", str(port), "-n", "1", "llen", f"c{ino}_0"],
                                        capture_output=True, text=True).stdout.strip() or 0)
            lat = []
            for _ in range(200):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                off = rng.randrange(0, size - 4 * KiB) & ~4095
                t = time.perf_counter()
                os.pread(fd, 4 * KiB, off)
                lat.append((time.perf_counter() - t) * 1e6)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            pos = 0
            while pos < size:
                pos += len(os.pread(fd, MiB, pos))
            seq_s = time.perf_counter() - t
            lat.sort()
            row = {"writes": done, "slices_in_chunk0": slices, "read_4k_median_us": round(statistics.median(lat)),
                   "read_4k_p90_us": round(lat[int(0.9 * len(lat))]), "seq_read_s": round(seq_s, 3),
                   "writes_per_s": round(per_round / write_s) if write_s else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
        os.close(fd)
        stats = json.loads(open(os.path.join(mp, ".stats")).read())
    finally:
        if daemon is not None:
            subprocess.run(["fusermount3", "-u", mp], capture_output=True)
            daemon.wait(30)
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["| random 4 KiB writes so far | slices in the chunk | 4 KiB read, median µs | p90 µs | "
             "12 MiB sequential read, s | writes/s in the round |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['writes']} | {r['slices_in_chunk0']} | {r['read_4k_median_us']} | {r['read_4k_p90_us']} | "
              f"{r['seq_read_s']} | {r['writes_per_s'] or '-'} |" for r in rows]
    lines.append(f"\ncompactions: {stats.get('compactions', 0)}")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
