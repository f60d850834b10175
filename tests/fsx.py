#!/usr/bin/env python3
"""fsx: a seeded random-operation exerciser of one file, in the spirit of the
classic fsx (File System eXerciser).

It keeps a model of the file (a bytearray: its content and size) and applies
random operations to the real file and to the model alike, checking what it
reads against the model:

  write       pwrite at random offsets/lengths, biased toward 4 MiB block and
              64 MiB chunk boundaries and toward the end of the file
  read        pread, verified (also past the end: short reads)
  mapread     mmap(PROT_READ) of a range, verified
  mapwrite    mmap(MAP_SHARED) write of a range, then msync(MS_SYNC); the
              file is ftruncate'd first if the range ends past it (as fsx)
  truncate    ftruncate, growing or shrinking
  falloc, falloc_keep, punch_hole, zero_range, zero_range_keep
              fallocate(2) with mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE,
              ZERO_RANGE and ZERO_RANGE|KEEP_SIZE, modelled as ext4 does
  fsync, reopen (close + open), verify (the whole file, sometimes after
              dropping the page cache with POSIX_FADV_DONTNEED)
  remount     every `remount_every` ops the file is closed, a caller's
              callback remounts (e.g. with an empty cache), the file is
              reopened and verified whole

The size is checked with fstat after every operation. Written bytes are a
pattern of the op number and the file offset (never 0, so holes stand out):
byte = 1 + (37*n + offset) % 251, so a wrong byte tells which op (mod 251)
wrote it. On a mismatch, `Mismatch` is raised with the seed, the op number,
the op log tail, the first differing offset, and expected vs got bytes; the
complete op log can be written as JSON (--log) and replayed (--replay) to
reduce a failure by hand.

A second mode (`run_pair`, --pair DIR2) runs two workers at once, each on its
own file through its own mount of one volume, while a background callable
(e.g. `jfscache gc META --compact`) runs repeatedly; afterwards each file is
verified through the other mount (close-to-open).

Library use:  Fsx(path, seed=1).run(3000) -> summary dict
Command line: python tests/fsx.py DIR [--seed N] [--ops N] ...   (--help)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import json
import mmap
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from helpers import first_diff

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4 * MiB
CHUNK = 64 * MiB
PAGE = mmap.PAGESIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = {
    "falloc": 0,
    "falloc_keep": FALLOC_FL_KEEP_SIZE,
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero_range": FALLOC_FL_ZERO_RANGE,
    "zero_range_keep": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
}

KINDS = ("write", "read", "mapread", "mapwrite", "truncate", *FALLOC_MODES,
         "fsync", "reopen", "verify")

PROFILES = {
    # a bit of everything, file up to 72 MiB (the 64 MiB chunk boundary is crossed)
    "default": dict(
        max_size=72 * MiB,
        weights=dict(write=30, read=18, mapread=6, mapwrite=6, truncate=4, falloc=2,
                     falloc_keep=2, punch_hole=3, zero_range=3, zero_range_keep=2,
                     fsync=4, reopen=3, verify=0.25),
        hot=None),
    # many small overlapping writes into one chunk (compaction past 100
    # slices), fsync'd often so they become slices of their own; a smaller
    # file, as every compaction rewrites what the chunk shows
    "compact": dict(
        max_size=20 * MiB,
        weights=dict(write=55, read=10, mapread=3, mapwrite=3, truncate=1, falloc=1,
                     falloc_keep=1, punch_hole=1.5, zero_range=1.5, zero_range_keep=1,
                     fsync=6, reopen=2, verify=0.3),
        hot=6 * MiB),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

_P = 251                         # pattern period (prime)
_MUL = 37                        # op number multiplier of the pattern phase
_MUL_INV = pow(_MUL, -1, _P)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FsxError(Exception):
    """An operation failed (an unexpected OSError), with the op log tail."""


class Mismatch(FsxError):
    """What was read differs from the model."""


def _hex(b) -> str:
    return bytes(b).hex(" ") if len(b) else "(nothing)"


class Fsx:
    """One file, one model, one seeded stream of operations."""

    def __init__(self, path: str | Path, seed: int = 1, *, profile: str = "default",
                 max_size: int | None = None, weights: dict | None = None,
                 remount: Callable[[], None] | None = None, remount_every: int = 0,
                 drop_cache: bool = True, log_tail: int = 20,
                 out: Callable[[str], None] | None = None, progress_every: int = 0,
                 name: str = "fsx", keep_log: bool = True,
                 stop: threading.Event | None = None):
        prof = PROFILES[profile]
        self.path = str(path)
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size or prof["max_size"]
        w = dict(prof["weights"])
        if weights:
            w.update(weights)
        self.kinds = [k for k in KINDS if w.get(k, 0) > 0]
        self.cum = []
        t = 0.0
        for k in self.kinds:
            t += w[k]
            self.cum.append(t)
        self.hot = prof["hot"]
        self.remount_cb = remount
        self.remount_every = remount_every
        self.drop_cache = drop_cache
        self.tail = collections.deque(maxlen=log_tail)
        self.history: list[tuple] | None = [] if keep_log else None
        self.out = out or (lambda s: print(s, flush=True))
        self.progress_every = progress_every
        self.name = name
        self.stop = stop             # set by someone else: run() ends early
        self.model = bytearray()
        self.fd: int | None = None
        self.n = 0
        self.counts = collections.Counter()
        self.times = collections.Counter()      # seconds spent per op kind
        self.slowest: list[tuple[float, str]] = []   # the 5 slowest ops
        self.bytes_written = 0
        self.bytes_read = 0
        self.remounts = 0
        self.t0 = 0.0
        self.big_max = 6 * MiB
        # write data: slices of a repeating pattern (see data())
        self.pat = memoryview(bytes(range(1, _P + 1)) * (self.big_max // _P + 2))
        self.boundaries = sorted({b for b in range(BLOCK, self.max_size, BLOCK)} |
                                 ({CHUNK} if CHUNK < self.max_size else set()))

    # -- file handling --------------------------------------------------
    def open(self, create: bool = True) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(self.path, flags, 0o644)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    # -- random choices -------------------------------------------------
    def _kind(self) -> str:
        x = self.rng.random() * self.cum[-1]
        for k, c in zip(self.kinds, self.cum):
            if x < c:
                return k
        return self.kinds[-1]

    def _len(self) -> int:
        r = self.rng.random()
        if self.hot is not None:
            if r < 0.8:
                return self.rng.randint(1, 8 * KiB)
            if r < 0.97:
                return self.rng.randint(8 * KiB, 256 * KiB)
            return self.rng.randint(256 * KiB, 2 * MiB)
        if r < 0.55:
            return self.rng.randint(1, 4 * KiB)
        if r < 0.85:
            return self.rng.randint(4 * KiB, 128 * KiB)
        if r < 0.97:
            return self.rng.randint(128 * KiB, MiB)
        return self.rng.randint(MiB, self.big_max)

    def _boundary(self) -> int:
        if CHUNK < self.max_size and self.rng.random() < 0.3:
            return CHUNK
        return self.rng.choice(self.boundaries)

    def _off(self, length: int, write: bool) -> int:
        """An offset for a range of `length`; writes stay within max_size."""
        rng, size = self.rng, len(self.model)
        r = rng.random()
        if r < 0.3:                                   # across (or next to) a boundary
            b = self._boundary()
            if rng.random() < 0.8 and length > 1:
                off = b - rng.randint(1, length - 1)   # crosses b
            else:
                off = b + rng.randint(-16 * KiB, 16 * KiB)
        elif r < 0.45:                                # around the end of the file
            off = size + rng.randint(-length, 64 * KiB)
        elif self.hot is not None and r < 0.9:        # the hot region
            off = rng.randrange(0, self.hot)
        elif r < 0.95 or not write:                   # inside the file
            off = rng.randrange(0, max(size, 1))
        else:                                         # anywhere
            off = rng.randrange(0, self.max_size)
        off = max(0, off)
        if write:
            off = min(off, self.max_size - length)
        return off

    def _new_size(self) -> int:
        rng, size = self.rng, len(self.model)
        r = rng.random()
        if r < 0.3:
            s = self._boundary() + rng.randint(-8 * KiB, 8 * KiB)
        elif r < 0.5 and size:
            s = size - rng.randint(0, min(size, 2 * MiB))
        elif r < 0.65 and size:
            s = rng.randrange(0, size)
        else:
            s = size + rng.randint(0, 8 * MiB)
        return max(0, min(s, self.max_size))

    def next_op(self) -> tuple:
        """The next op as a tuple (n, kind, a, b): offset/length, or the new
        size for truncate, or (drop cache?) for verify."""
        n = self.n + 1
        kind = self._kind()
        size = len(self.model)
        if kind == "write" or kind == "mapwrite" or kind in FALLOC_MODES:
            length = self._len()
            if kind in ("falloc", "falloc_keep"):
                length = self.rng.choice((length, length * 8))   # allocate more at once
            length = min(length, self.max_size)
            return (n, kind, self._off(length, True), length)
        if kind in ("read", "mapread"):
            length = self._len()
            if kind == "mapread":
                if size == 0:
                    return (n, "read", 0, length)
                off = self._off(length, False) % size
                return (n, kind, off, min(length, size - off))
            return (n, kind, self._off(length, False), length)
        if kind == "truncate":
            return (n, kind, self._new_size(), 0)
        if kind == "verify":
            return (n, kind, int(self.drop_cache and self.rng.random() < 0.5), 0)
        return (n, kind, 0, 0)

    # -- the model ------------------------------------------------------
    def data(self, n: int, off: int, length: int) -> memoryview:
        s = (_MUL * n + off) % _P
        return self.pat[s:s + length]

    def _model_write(self, off: int, data) -> None:
        end = off + len(data)
        if end > len(self.model):
            self.model.extend(bytes(end - len(self.model)))
        self.model[off:end] = data

    def _model_resize(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def _model_zero(self, off: int, end: int) -> None:
        end = min(end, len(self.model))
        if end > off:
            self.model[off:end] = bytes(end - off)

    # -- running --------------------------------------------------------
    def describe(self, op: tuple) -> str:
        n, kind, a, b = op[:4]
        size = op[4] if len(op) > 4 else None
        if kind == "truncate":
            s = f"#{n} truncate {a:#x}"
        elif kind in ("fsync", "reopen", "remount"):
            s = f"#{n} {kind}"
        elif kind == "verify":
            s = f"#{n} verify" + (" (page cache dropped)" if a else "")
        else:
            s = f"#{n} {kind} {a:#x}..{a + b:#x} len {b:#x}"
        return s + (f"  [size before {size:#x}]" if size is not None else "")

    def _log(self, op: tuple) -> None:
        rec = (*op, len(self.model))
        self.tail.append(rec)
        if self.history is not None:
            self.history.append(rec)

    def step(self, op: tuple | None = None) -> None:
        op = op or self.next_op()
        self.n = op[0]
        self._log(op)
        t = time.perf_counter()
        try:
            self.execute(op)
        except FsxError:
            raise
        except OSError as e:
            raise FsxError(self._report(f"op #{op[0]} ({op[1]}) failed: "
                                        f"{errno.errorcode.get(e.errno, e.errno)} {e}")) from e
        self.counts[op[1]] += 1
        self._check_size(op)
        dt = time.perf_counter() - t
        self.times[op[1]] += dt
        if len(self.slowest) < 5 or dt > self.slowest[0][0]:
            self.slowest.append((dt, self.describe(op)))
            self.slowest.sort()
            del self.slowest[:-5]

    def run(self, ops: int, replay: list | None = None) -> dict:
        """Run `ops` random ops (or the ops of `replay`), verify at the end,
        return the summary; raises Mismatch or FsxError."""
        self.t0 = time.monotonic()
        if self.fd is None:
            self.open(create=True)
        todo = replay if replay is not None else range(ops)
        for item in todo:
            if self.stop is not None and self.stop.is_set():
                break
            if replay is not None:
                op = tuple(item[:4])
                if op[1] == "remount":
                    self.n = op[0]
                    self._remount()
                    continue
                self.step(op)
            else:
                self.step()
                if self.remount_every and self.n % self.remount_every == 0:
                    self._remount()
            if self.progress_every and self.n % self.progress_every == 0:
                dt = time.monotonic() - self.t0
                self.out(f"[{self.name}] {self.n} ops, {self.n / dt:.0f} ops/s, size "
                         f"{len(self.model) / MiB:.1f} MiB, {self.remounts} remounts")
        self.verify_all(drop=True)
        self.counts["verify"] += 1
        return self.summary()

    def _remount(self) -> None:
        t = time.perf_counter()
        self.close()
        self._log((self.n, "remount", 0, 0))
        if self.remount_cb is not None:
            self.remount_cb()
        self.remounts += 1
        self.counts["remount"] += 1
        self.open(create=False)
        self.verify_all(drop=False)
        self._check_size((self.n, "remount", 0, 0))
        self.times["remount"] += time.perf_counter() - t

    def summary(self) -> dict:
        return {
            "name": self.name, "seed": self.seed, "ops": self.n,
            "per_kind": {k: self.counts.get(k, 0) for k in (*KINDS, "remount")},
            "mismatches": 0, "errors": 0,
            "bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
            "remounts": self.remounts, "final_size": len(self.model),
            "seconds_per_kind": {k: round(v, 2) for k, v in self.times.most_common()},
            "slowest_ops": [f"{dt:.2f}s {d}" for dt, d in reversed(self.slowest)],
            "seconds": round(time.monotonic() - self.t0, 2),
        }

    # -- operations -----------------------------------------------------
    def execute(self, op: tuple) -> None:
        n, kind, a, b = op[:4]
        fd = self.fd
        if kind == "write":
            data = self.data(n, a, b)
            done = os.pwrite(fd, data, a)
            if done != b:
                raise FsxError(self._report(f"short write: {done} of {b} bytes"))
            self._model_write(a, data)
            self.bytes_written += b
        elif kind == "read":
            got = os.pread(fd, b, a)
            self.bytes_read += len(got)
            self._compare(a, self.model[a:a + b], got, "pread")
        elif kind == "mapread":
            if b == 0:
                return
            pg = a - a % PAGE
            with mmap.mmap(fd, a + b - pg, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                           offset=pg) as mm:
                got = mm[a - pg:a - pg + b]
            self.bytes_read += b
            self._compare(a, self.model[a:a + b], got, "mmap read")
        elif kind == "mapwrite":
            if b == 0:
                return
            if a + b > len(self.model):
                os.ftruncate(fd, a + b)
                self._model_resize(a + b)
            data = self.data(n, a, b)
            pg = a - a % PAGE
            with mmap.mmap(fd, a + b - pg, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=pg) as mm:
                mm[a - pg:a - pg + b] = data
                mm.flush()                             # msync(MS_SYNC)
            self._model_write(a, data)
            self.bytes_written += b
        elif kind == "truncate":
            os.ftruncate(fd, a)
            self._model_resize(a)
        elif kind in FALLOC_MODES:
            mode = FALLOC_MODES[kind]
            fallocate(fd, mode, a, b)
            end = a + b
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                self._model_zero(a, end)
            if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.model):
                self._model_resize(end)
        elif kind == "fsync":
            os.fsync(fd)
        elif kind == "reopen":
            self.close()
            self.open(create=False)
        elif kind == "verify":
            self.verify_all(drop=bool(a))
        else:
            raise ValueError(kind)

    def _check_size(self, op) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Mismatch(self._report(
                f"size mismatch after op #{op[0]} ({op[1]}): fstat says {size:#x} ({size}), "
                f"the model {len(self.model):#x} ({len(self.model)})"))

    def verify_all(self, drop: bool = False, fd: int | None = None, label: str = "") -> None:
        """Read the whole file (1 MiB preads) and compare with the model."""
        fd = self.fd if fd is None else fd
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = len(self.model)
        st = os.fstat(fd).st_size
        if st != size:
            raise Mismatch(self._report(f"{label}verify: fstat size {st:#x}, the model {size:#x}"))
        pos = 0
        while pos < size:
            n = min(MiB, size - pos)
            got = os.pread(fd, n, pos)
            self.bytes_read += len(got)
            self._compare(pos, self.model[pos:pos + n], got, f"{label}full verify")
            pos += n
        tail = os.pread(fd, 4096, size)
        if tail:
            raise Mismatch(self._report(f"{label}verify: {len(tail)} bytes read past the end "
                                        f"({size:#x}): {_hex(tail[:32])}"))

    # -- reports --------------------------------------------------------
    def _compare(self, off: int, want, got, what: str) -> None:
        if want == got:
            return
        i = first_diff(want, got)
        at = off + i
        lo = max(0, i - 8)
        msg = [f"{what} at {off:#x} len {len(want):#x}: data differ at file offset {at:#x} "
               f"({at}; block {at // BLOCK} +{at % BLOCK:#x}, chunk {at // CHUNK} +{at % CHUNK:#x})"]
        if len(want) != len(got):
            msg.append(f"  read returned {len(got):#x} bytes, the model has {len(want):#x}")
        msg.append(f"  expected [{off + lo:#x}]: {_hex(want[lo:i + 24])}")
        msg.append(f"  got      [{off + lo:#x}]: {_hex(got[lo:i + 24])}")
        if i < len(got):
            msg.append("  " + self._whose(at, got[i]))
        if i < len(want):
            msg.append("  expected " + self._whose(at, want[i]))
        # how long the bad run is (within what was read)
        j = i
        n = min(len(want), len(got))
        while j < n and want[j] != got[j]:
            j += 1
        msg.append(f"  first bad run: {j - i:#x} bytes from {at:#x}")
        raise Mismatch(self._report("\n".join(msg)))

    def _whose(self, at: int, byte: int) -> str:
        if byte == 0:
            return "byte 0x00 (a hole / zeroed range / never written)"
        k = ((byte - 1 - at) % _P) * _MUL_INV % _P
        s = f"byte {byte:#04x} was written by an op #n with n % {_P} == {k}"
        if self.history:
            who = [r[0] for r in self.history if r[1] in ("write", "mapwrite") and r[0] % _P == k
                   and r[2] <= at < r[2] + r[3]]
            if who:
                s += f" (writes covering it: {', '.join('#%d' % w for w in who[-5:])})"
            else:
                s += " (no write op covering this offset matches)"
        return s

    def _report(self, what: str) -> str:
        lines = [f"FSX FAILURE [{self.name}] {what}",
                 f"  file {self.path}, seed {self.seed}, op #{self.n}, model size "
                 f"{len(self.model):#x}, {self.remounts} remounts so far",
                 f"  last {len(self.tail)} ops:"]
        lines += ["    " + self.describe(r) for r in self.tail]
        return "\n".join(lines)

    def dump_log(self, path: str | Path) -> None:
        """The complete op log as JSON (a list of [n, kind, a, b, size_before])."""
        with open(path, "w") as f:
            json.dump({"seed": self.seed, "max_size": self.max_size,
                       "ops": self.history or list(self.tail)}, f)


def verify_other(fsx: Fsx, path: str | Path, label: str = "") -> None:
    """Verify fsx's model against `path` (e.g. the file through another
    mount), opened afresh; fsx's own descriptor must be closed."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fsx.verify_all(drop=False, fd=fd, label=label)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# two mounts, two workers, a background job (gc / compaction)

def run_pair(dir_a: str | Path, dir_b: str | Path, seed: int, ops: int, *,
             profile: str = "compact", background: Callable[[], object] | None = None,
             background_interval: float = 3.0, min_background_runs: int = 0,
             out: Callable[[str], None] | None = None, progress_every: int = 0, **fsx_kw) -> dict:
    """Worker 0 runs fsx on DIR_A/fsx-0, worker 1 on DIR_B/fsx-1 (two mounts
    of one volume), at once, while `background()` runs again and again
    (`background_interval` seconds apart). Workers go on past `ops`, a tenth
    of it at a time, until `background()` has completed `min_background_runs`
    times: how many fit must not depend on the machine's speed. Then each file is verified
    through the other mount. Returns {"workers": [summary, summary],
    "background_runs": n, "background_errors": [...], "cross_verified": [...]}.
    Raises the first worker's Mismatch/FsxError (after stopping everything)."""
    out = out or (lambda s: print(s, flush=True))
    dirs = [Path(dir_a), Path(dir_b)]
    failed = threading.Event()
    workers = [Fsx(dirs[i] / f"fsx-{i}", seed=seed * 1000 + i, profile=profile, out=out,
                   name=f"worker{i}", progress_every=progress_every, stop=failed, **fsx_kw)
               for i in range(2)]
    results: list = [None, None]
    errors: list = [None, None]
    done = threading.Event()
    bg_runs, bg_errors = [0], []

    def work(i: int) -> None:
        try:
            results[i] = workers[i].run(ops)
            while background and bg_runs[0] < min_background_runs and not failed.is_set():
                results[i] = workers[i].run(max(ops // 10, 10))
        except BaseException as e:  # noqa: BLE001  (reported by the caller's thread)
            errors[i] = e
            failed.set()   # the other worker stops too
        finally:
            with contextlib.suppress(Exception):
                workers[i].close()

    def bg() -> None:
        while not done.wait(background_interval):
            try:
                r = background()
                bg_runs[0] += 1
                if r is not None and getattr(r, "returncode", 0) != 0:
                    bg_errors.append(f"exit {r.returncode}: {getattr(r, 'stdout', '')}"
                                     f"{getattr(r, 'stderr', '')}"[-2000:])
            except Exception as e:  # noqa: BLE001
                bg_errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,), name=f"fsx-worker{i}") for i in range(2)]
    bgt = threading.Thread(target=bg, name="fsx-background") if background else None
    t0 = time.monotonic()
    for t in threads:
        t.start()
    if bgt:
        bgt.start()
    for t in threads:
        t.join()
    done.set()
    if bgt:
        bgt.join()
    for e in errors:
        if e is not None:
            raise e
    cross = []
    for i, w in enumerate(workers):
        other = dirs[1 - i] / f"fsx-{i}"
        verify_other(w, other, label=f"through the other mount ({other}): ")
        cross.append(str(other))
    return {"workers": results, "background_runs": bg_runs[0], "background_errors": bg_errors,
            "cross_verified": cross, "seconds": round(time.monotonic() - t0, 2)}


# --------------------------------------------------------------------------
# command line

def _size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="fsx: random operations on one file in DIR, checked against an in-memory "
                    "model. Exit status 1 on a mismatch or a failed operation.")
    ap.add_argument("dir", help="a directory, e.g. on a jfscache mount")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=10000)
    ap.add_argument("--file", default="fsx.bin", help="file name in DIR (default fsx.bin)")
    ap.add_argument("--profile", choices=sorted(PROFILES),
                    help="op mix and file size (default: 'default'; with --pair: 'compact')")
    ap.add_argument("--max-size", type=_size, help="largest file size (default 72M; 20M for compact)")
    ap.add_argument("--weight", action="append", default=[], metavar="KIND=W",
                    help=f"override an op weight (kinds: {', '.join(KINDS)}); W=0 disables")
    ap.add_argument("--remount-every", type=int, default=0, metavar="K",
                    help="every K ops: close, run --remount-cmd (if any), reopen, verify all")
    ap.add_argument("--remount-cmd", help="shell command run at each remount")
    ap.add_argument("--no-drop-cache", action="store_true",
                    help="verify ops never drop the page cache first")
    ap.add_argument("--log", help="write the complete op log as JSON here (on failure too)")
    ap.add_argument("--replay", help="replay the ops of a JSON op log (--log) instead")
    ap.add_argument("--progress", type=int, default=0, metavar="N", help="a progress line every N ops")
    ap.add_argument("--pair", metavar="DIR2",
                    help="two-mount mode: worker 0 in DIR, worker 1 in DIR2 (a second mount of "
                         "the same volume), each file verified through the other mount at the end")
    ap.add_argument("--background-cmd", help="(--pair) shell command run repeatedly meanwhile, "
                                             "e.g. 'jfscache gc redis://... --compact'")
    ap.add_argument("--background-interval", type=float, default=3.0)
    a = ap.parse_args(argv)
    weights = {}
    for w in a.weight:
        k, _, v = w.partition("=")
        if k not in KINDS:
            ap.error(f"unknown op kind {k!r}")
        weights[k] = float(v)

    def sh(cmd):
        return lambda: subprocess.run(cmd, shell=True, capture_output=True, text=True)

    if a.pair:
        bg = sh(a.background_cmd) if a.background_cmd else None
        try:
            res = run_pair(a.dir, a.pair, a.seed, a.ops, profile=a.profile or "compact", background=bg,
                           background_interval=a.background_interval, progress_every=a.progress,
                           max_size=a.max_size, weights=weights,
                           drop_cache=not a.no_drop_cache)
        except FsxError as e:
            print(e, file=sys.stderr)
            return 1
        print(json.dumps(res, indent=1))
        return 1 if res["background_errors"] else 0

    def run_remount_cmd():
        r = subprocess.run(a.remount_cmd, shell=True)
        if r.returncode:
            raise FsxError(f"--remount-cmd {shlex.quote(a.remount_cmd)} exited {r.returncode}")
    remount = run_remount_cmd if a.remount_cmd else None
    replay = None
    if a.replay:
        with open(a.replay) as f:
            replay = json.load(f)["ops"]
    fsx = Fsx(Path(a.dir) / a.file, a.seed, profile=a.profile or "default", max_size=a.max_size,
              weights=weights, remount=remount, remount_every=a.remount_every,
              drop_cache=not a.no_drop_cache, progress_every=a.progress)
    try:
        summary = fsx.run(a.ops, replay=replay)
    except FsxError as e:
        print(e, file=sys.stderr)
        if a.log:
            fsx.dump_log(a.log)
            print(f"op log: {a.log}", file=sys.stderr)
        return 1
    finally:
        fsx.close()
    if a.log:
        fsx.dump_log(a.log)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
