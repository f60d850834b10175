"""A mixed read/write load on a directory, with every byte read checked.

    from loadgen import LoadGen            # tests (tests/ is on sys.path)
    from tests.loadgen import LoadGen      # the bench (repo root on sys.path)

    lg = LoadGen(root, writers=8, readers=8, seconds=20, pid=daemon_pid)
    result = lg.run()                      # the load; a dict (see LoadGen.run)
    ...remount...
    check = lg.verify_all()                # every file that remains, whole

Plain os calls only (os.open/pwrite/preadv/mmap...), so it runs against any
file system (a tmpfs directory checks the load generator itself).

Writers (one directory `w<id>` each, plus a shared `tmp` for renames into
place) create files of mixed sizes (1 KiB .. --max-size, mostly small and
medium) in random-sized pieces, in order or out of order (pwrite), fsync some,
and sometimes: create under `tmp/` and rename into place (also over an
existing file, replacing it), overwrite a range in the middle, append with
O_APPEND, truncate shorter, rename, unlink. Each writer keeps its live bytes
under budget / writers by unlinking its oldest files.

Readers pick a finished (closed, published) file at random and read it
whole (read / preadv loops of random sizes), in random ranges (pread, some
past EOF), or through mmap, and compare every byte with the model.

Content: every file is a list of extents (start, end, key); the byte at file
offset `o` of an extent with key `k` is POOL[k + o], POOL being one fixed
pseudo-random buffer of 48 MiB + max size. A key is a hash of (writer, file,
version). Writing is a memoryview slice of POOL and checking a range is a
`startswith` against it: no copies, no hashing, so the 2 cores stay with the
daemon. Because keys are random positions in a period that no file size
reaches, a block served from another file, another version of this file or
another offset of it differs from what is expected (and the mismatch report
says where the bytes actually came from, when it can find them in POOL).

Coordination (so that every expectation is exact): a reader registers on a
file before it opens it; a writer that unlinks, renames over or renames a file
first withdraws it from the readers' pool and waits until no reader is *in
open()* (a reader that has it open keeps reading the now unlinked or renamed
inode, whose content does not change: POSIX says it stays readable); a writer
that changes the content (overwrite, append, truncate) waits until no reader
has it open at all.
"""
from __future__ import annotations

import collections
import hashlib
import mmap
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KiB = 1 << 10
MiB = 1 << 20

# --------------------------------------------------------------------------
# content

POOL_PERIOD = 48 * MiB - 13          # odd: no 4 KiB/4 MiB alignment lines up keys
MAX_FILE = 32 * MiB                  # no file grows past this (appends stop short)
_POOL: bytes | None = None
_POOL_MV: memoryview | None = None
_POOL_LOCK = threading.Lock()


def pool() -> memoryview:
    """The shared content buffer (80 MiB, built once, ~0.2 s)."""
    global _POOL, _POOL_MV
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = hashlib.shake_128(b"jfscache loadgen pool v1").digest(POOL_PERIOD + MAX_FILE)
            _POOL_MV = memoryview(_POOL)
        return _POOL_MV


def key_for(*parts) -> int:
    """A deterministic content key (a position in the pool period)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % POOL_PERIOD


def locate(sample: bytes) -> int | None:
    """Where in the pool `sample` comes from (pool index), if anywhere."""
    if len(sample) < 16 or sample.count(sample[:1]) == len(sample):
        return None
    pool()
    i = _POOL.find(sample)
    return None if i < 0 else i


@dataclass(frozen=True)
class Content:
    """A file's expected content: sorted, non-overlapping extents
    (start, end, key) covering [0, size)."""
    size: int
    ext: tuple = ()

    @staticmethod
    def new(size: int, key: int) -> "Content":
        return Content(size, ((0, size, key),) if size else ())

    def write(self, a: int, b: int, key: int) -> "Content":
        assert 0 <= a <= self.size and a <= b, (a, b, self.size)   # never leaves a hole
        out = []
        for s, e, k in self.ext:
            if e <= a or s >= b:
                out.append((s, e, k))
            else:
                if s < a:
                    out.append((s, a, k))
                if e > b:
                    out.append((b, e, k))
        if b > a:
            out.append((a, b, key))
        out.sort()
        return Content(max(self.size, b), tuple(out))

    def truncate(self, n: int) -> "Content":
        assert n <= self.size
        out = tuple((s, min(e, n), k) for s, e, k in self.ext if s < n)
        return Content(n, out)

    def source(self, off: int, n: int) -> list[tuple[int, int, int]]:
        """[(file offset, length, pool index)] covering [off, off + n) ∩ [0, size)."""
        end = min(off + n, self.size)
        out = []
        for s, e, k in self.ext:
            if e <= off or s >= end:
                continue
            a, b = max(s, off), min(e, end)
            out.append((a, b - a, k + a))
        return out

    def expected(self, off: int, n: int) -> bytes:
        p = pool()
        return b"".join(p[i:i + ln] for _, ln, i in self.source(off, n))

    def check(self, data, off: int, n: int | None = None) -> int | None:
        """None if data[:n] is exactly the file's bytes from `off` (to EOF
        when short), else the index of the first wrong byte (or the length
        where it is short or long)."""
        n = len(data) if n is None else n
        want = max(0, min(self.size - off, n if n else 0))
        p = pool()
        if n != want:
            return min(n, want)
        for a, ln, i in self.source(off, n):
            if not data.startswith(p[i:i + ln], a - off, a - off + ln):
                exp = p[i:i + ln]
                got = memoryview(data)[a - off:a - off + ln]
                j = 0
                step = 4096
                while j < ln and got[j:j + step] == exp[j:j + step]:
                    j += step
                while j < ln and got[j] == exp[j]:
                    j += 1
                return a - off + j
        return None


# --------------------------------------------------------------------------
# bookkeeping

class FileRec:
    """A file a writer made. `path` is relative to the root. The fields
    after `content` are guarded by the LoadGen's condition."""
    __slots__ = ("path", "content", "writer", "seq", "history", "idx", "opening", "open",
                 "version")

    def __init__(self, path: str, content: Content, writer: int, seq: int):
        self.path, self.content, self.writer, self.seq = path, content, writer, seq
        self.history: list[str] = []
        self.idx = -1          # index in LoadGen._pub, -1 when not published
        self.opening = 0       # readers between pick and the end of open()
        self.open = 0          # readers from pick to close()
        self.version = 0

    def note(self, what: str) -> None:
        if len(self.history) < 40:
            self.history.append(what)


class Stats:
    """Per-thread counters: kind -> [ops, bytes, seconds, max seconds]."""

    def __init__(self):
        self.k: dict[str, list] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])

    def add(self, kind: str, nbytes: int, secs: float) -> None:
        v = self.k[kind]
        v[0] += 1
        v[1] += nbytes
        v[2] += secs
        if secs > v[3]:
            v[3] = secs

    @staticmethod
    def merge(many) -> dict[str, list]:
        out: dict[str, list] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
        for s in many:
            for kind, v in list(s.k.items()):
                o = out[kind]
                o[0] += v[0]
                o[1] += v[1]
                o[2] += v[2]
                o[3] = max(o[3], v[3])
        return out


def read_rss(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of pid in MiB, None when gone."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


def pick_size(rng: random.Random, max_size: int) -> int:
    """Mostly small and medium: 45 % 1-64 KiB, 30 % 64 KiB-1 MiB, 17 %
    1-6 MiB, 8 % 6 MiB-max (log-uniform within each band)."""
    r = rng.random()
    if r < 0.45:
        lo, hi = 1 * KiB, 64 * KiB
    elif r < 0.75:
        lo, hi = 64 * KiB, 1 * MiB
    elif r < 0.92:
        lo, hi = 1 * MiB, 6 * MiB
    else:
        lo, hi = 6 * MiB, max_size
    hi = max(lo + 1, min(hi, max_size))
    return int(lo * (hi / lo) ** rng.random())


def _pieces(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """Split [0, size) into random-sized pieces: 1 B .. 2 MiB, biased small."""
    out, pos = [], 0
    while pos < size:
        r = rng.random()
        if r < 0.3:
            n = rng.randint(1, 16 * KiB)
        elif r < 0.7:
            n = rng.randint(16 * KiB, 256 * KiB)
        else:
            n = rng.randint(256 * KiB, 2 * MiB)
        n = min(n, size - pos)
        out.append((pos, n))
        pos += n
    return out


# --------------------------------------------------------------------------
# the load

class LoadGen:
    def __init__(self, root: str | Path, writers: int = 8, readers: int = 8,
                 seconds: float = 20, pid: int | None = None, budget: int = 1536 * MiB,
                 max_size: int = 20 * MiB, seed: int = 1, sample_interval: float = 1.0,
                 progress: Callable[[dict], None] | None = None, progress_every: float = 10.0,
                 max_errors: int = 200, drop_ratio: float = 0.3):
        assert 4 * KiB <= max_size <= MAX_FILE - 4 * MiB, max_size
        self.root = Path(root)
        self.writers, self.readers, self.seconds = writers, readers, seconds
        self.pid, self.budget, self.max_size, self.seed = pid, budget, max_size, seed
        self.sample_interval = sample_interval
        self.progress, self.progress_every = progress, progress_every
        self.max_errors = max_errors
        self.drop_ratio = drop_ratio   # reads that first drop the file's page cache
        self.cond = threading.Condition()
        self._pub: list[FileRec] = []          # files readers may pick
        self._all: dict[int, list[FileRec]] = {}   # writer id -> its live files, oldest first
        self.uncertain: set[str] = set()       # paths an op failed on: content unknown
        self.errors: list[dict] = []
        self.error_count = 0
        self.mismatches: list[dict] = []
        self.mismatch_count = 0
        self.key_owner: dict[int, str] = {}    # content key -> "path vN" (for reports)
        self.stop = threading.Event()
        self.stats: list[Stats] = []
        self.rss: list[tuple[float, float]] = []
        self.t0 = 0.0
        self._elock = threading.Lock()
        pool()

    # -- reporting ----------------------------------------------------------
    def error(self, who: str, op: str, path: str | None, exc: BaseException) -> None:
        with self._elock:
            self.error_count += 1
            if len(self.errors) < 100:
                self.errors.append({"t": round(time.monotonic() - self.t0, 2), "who": who, "op": op,
                                    "path": path, "error": f"{type(exc).__name__}: {exc}",
                                    "where": traceback.format_exception(exc)[-2].strip()[-300:]})
            if self.error_count >= self.max_errors:
                self.stop.set()

    def mismatch(self, who: str, how: str, rec_path: str, content: Content, off: int, data,
                 at: int, history: list[str]) -> None:
        """Record a wrong byte at file offset off + at, with what it should
        have been and where the bytes that were read come from."""
        n = len(data) if not isinstance(data, tuple) else data[1]
        buf = data if not isinstance(data, tuple) else data[0]
        fo = off + at
        got = bytes(memoryview(buf)[at:at + 64]) if at < n else b""
        exp = content.expected(fo, 64)
        src = self.whence(got)
        with self._elock:
            self.mismatch_count += 1
            if len(self.mismatches) < 50:
                self.mismatches.append({
                    "t": round(time.monotonic() - self.t0, 2), "who": who, "how": how,
                    "path": rec_path, "read_offset": off, "read_length": n,
                    "first_bad_offset": fo, "expected_size": content.size,
                    "got_len": n, "got": got[:32].hex(), "expected": exp[:32].hex(),
                    "got_comes_from": src, "extents": [list(e) for e in content.ext][:20],
                    "history": list(history)})
            if self.mismatch_count >= self.max_errors:
                self.stop.set()

    def whence(self, got: bytes) -> str | None:
        """Where the bytes read at a bad offset come from: zeros, or a
        version of some file (by its content key), or unknown."""
        if len(got) >= 32:
            i = locate(got[:32])
            if i is not None:
                owners = [f"{o} at file offset {i - k}"
                          for k, o in list(self.key_owner.items()) if 0 <= i - k < MAX_FILE]
                return f"pool index {i}: " + ("; ".join(owners[:5]) if owners else "no known key")
        if got and got.count(0) == len(got):
            return "zeros"
        return None

    # -- registry (under self.cond) ------------------------------------------
    def _publish(self, rec: FileRec) -> None:
        with self.cond:
            assert rec.idx < 0
            rec.idx = len(self._pub)
            self._pub.append(rec)

    def _unpublish(self, rec: FileRec) -> None:
        """Take rec out of the readers' pool (O(1): the last entry fills its
        slot). The caller holds self.cond."""
        if rec.idx >= 0:
            last = self._pub.pop()
            if last is not rec:
                self._pub[rec.idx] = last
                last.idx = rec.idx
            rec.idx = -1

    def _withdraw(self, rec: FileRec, until: str, timeout: float = 300) -> None:
        """Take rec out of the readers' pool and wait until no reader is in
        open() (until="opening") or has it open at all (until="open")."""
        with self.cond:
            self._unpublish(rec)
            if not self.cond.wait_for(lambda: getattr(rec, until) == 0, timeout):
                raise TimeoutError(f"readers still have {rec.path} after {timeout:.0f} s")

    def _pick(self, rng: random.Random) -> tuple[FileRec, str, Content] | None:
        with self.cond:
            if not self._pub:
                return None
            rec = self._pub[rng.randrange(len(self._pub))]
            rec.opening += 1
            rec.open += 1
            return rec, rec.path, rec.content

    def _opened(self, rec: FileRec) -> None:
        with self.cond:
            rec.opening -= 1
            if rec.opening == 0:
                self.cond.notify_all()

    def _closed(self, rec: FileRec) -> None:
        with self.cond:
            rec.open -= 1
            if rec.open == 0:
                self.cond.notify_all()

    # -- writers -------------------------------------------------------------
    def _writer(self, wid: int, st: Stats) -> None:
        rng = random.Random(f"{self.seed}-w{wid}")
        d = f"w{wid}"
        os.makedirs(self.root / d, exist_ok=True)
        own: list[FileRec] = []
        self._all[wid] = own
        share = self.budget // max(1, self.writers)
        live = 0
        seq = 0
        while not self.stop.is_set():
            seq += 1
            r = rng.random()
            rec = None
            op = "create"
            try:
                if own and r < 0.10:
                    op, rec = "overwrite", rng.choice(own)
                    live += self._overwrite(rec, rng, st)
                elif own and r < 0.18:
                    op, rec = "append", rng.choice(own)
                    live += self._append(rec, rng, st)
                elif own and r < 0.21:
                    op, rec = "truncate", rng.choice(own)
                    live += self._truncate(rec, rng, st)
                elif own and r < 0.24:
                    op, rec = "rename", rng.choice(own)
                    self._rename(rec, f"{d}/f{seq:06d}.mv", st)
                elif own and r < 0.29:
                    op, rec = "unlink", own[rng.randrange(len(own))]
                    live -= self._unlink(rec, own, st)
                else:
                    live += self._create(wid, seq, d, own, rng, st)
                while live > share and len(own) > 1 and not self.stop.is_set():
                    op, rec = "unlink", own[0]
                    live -= self._unlink(rec, own, st)
            except Exception as e:  # noqa: BLE001 - every failure is an error
                path = rec.path if rec is not None else f"{d}/f{seq:06d}"
                self.error(f"writer {wid}", op, path, e)
                if rec is not None:
                    self._forget(rec, own)
                live = sum(x.content.size for x in own)
                self.uncertain.update({f"{d}/f{seq:06d}", f"{d}/f{seq:06d}.mv",
                                       f"tmp/w{wid}-{seq:06d}"})
                time.sleep(0.2)

    def _forget(self, rec: FileRec, own: list[FileRec]) -> None:
        """An op on rec failed: its content is unknown from now on."""
        with self.cond:
            self._unpublish(rec)
        if rec in own:
            own.remove(rec)
        self.uncertain.add(rec.path)

    def _write_all(self, fd: int, pieces, key: int, base: int, rng: random.Random,
                   st: Stats, append: bool = False) -> None:
        """Write the pieces (file offset, length) of content `key`; in order
        with write() (the kernel's offset), or with pwrite()."""
        p = pool()
        use_pwrite = not append and rng.random() < 0.5
        for off, n in pieces:
            src = p[key + base + off:key + base + off + n]
            done = 0
            while done < n:
                if use_pwrite:
                    k = os.pwrite(fd, src[done:], base + off + done)
                else:
                    k = os.write(fd, src[done:])
                if k <= 0:
                    raise OSError(f"write returned {k}")
                done += k

    def _maybe_fsync(self, fd: int, rng: random.Random, st: Stats, p: float) -> bool:
        if rng.random() < p:
            t = time.perf_counter()
            os.fsync(fd)
            st.add("fsync", 0, time.perf_counter() - t)
            return True
        return False

    def _create(self, wid: int, seq: int, d: str, own: list[FileRec], rng: random.Random,
                st: Stats) -> int:
        size = pick_size(rng, self.max_size)
        key = key_for(self.seed, wid, seq, 0)
        final = f"{d}/f{seq:06d}"
        mode = rng.random()
        how = "direct" if mode < 0.6 else ("tmp+rename" if mode < 0.9 or not own else "tmp+rename-over")
        target = final if how == "direct" else f"tmp/w{wid}-{seq:06d}"
        pieces = _pieces(rng, size)
        order = "seq"
        if rng.random() < 0.15 and len(pieces) > 1:
            rng.shuffle(pieces)
            order = "shuffled"
        rec = FileRec(final, Content.new(size, key), wid, seq)
        self.key_owner[key] = f"{final} v0"
        t = time.perf_counter()
        fd = os.open(self.root / target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if order == "shuffled":   # out of order: pwrite only
                p = pool()
                for off, n in pieces:
                    src = p[key + off:key + off + n]
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, src[done:], off + done)
            else:
                self._write_all(fd, pieces, key, 0, rng, st)
            synced = self._maybe_fsync(fd, rng, st, 0.3)
        finally:
            os.close(fd)
        st.add("create", size, time.perf_counter() - t)
        rec.note(f"create {size} B via {how}, {len(pieces)} pieces {order}"
                 f"{', fsync' if synced else ''}")
        gone = 0
        if how != "direct":
            if how == "tmp+rename-over":
                victim = rng.choice(own)
                self._withdraw(victim, "opening")
                rec.path = victim.path
                rec.note(f"renamed from {target} over {victim.path} (was f{victim.seq:06d})")
                self.key_owner[key] = f"{rec.path} v0 (f{seq:06d})"
                own.remove(victim)
                gone = victim.content.size
            else:
                rec.note(f"renamed from {target}")
            t = time.perf_counter()
            try:
                os.rename(self.root / target, self.root / rec.path)
            except BaseException:
                self.uncertain.add(rec.path)
                raise
            st.add("rename", 0, time.perf_counter() - t)
        own.append(rec)
        self._publish(rec)
        return size - gone

    def _overwrite(self, rec: FileRec, rng: random.Random, st: Stats) -> int:
        self._withdraw(rec, "open")
        c = rec.content
        a = rng.randrange(c.size)
        n = min(c.size - a, rng.choice((rng.randint(1, 4 * KiB), rng.randint(1, 256 * KiB),
                                        rng.randint(1, 4 * MiB))))
        rec.version += 1
        key = key_for(self.seed, rec.writer, rec.seq, rec.version)
        self.key_owner[key] = f"{rec.path} v{rec.version}"
        t = time.perf_counter()
        fd = os.open(self.root / rec.path, os.O_WRONLY)
        try:
            p = pool()
            for off, ln in _pieces(rng, n):
                src = p[key + a + off:key + a + off + ln]
                done = 0
                while done < ln:
                    done += os.pwrite(fd, src[done:], a + off + done)
            synced = self._maybe_fsync(fd, rng, st, 0.3)
        finally:
            os.close(fd)
        st.add("overwrite", n, time.perf_counter() - t)
        rec.content = c.write(a, a + n, key)
        rec.note(f"overwrite [{a}, {a + n}) v{rec.version}{', fsync' if synced else ''}")
        self._publish(rec)
        return 0

    def _append(self, rec: FileRec, rng: random.Random, st: Stats) -> int:
        self._withdraw(rec, "open")
        c = rec.content
        n = min(MAX_FILE - c.size, rng.choice((rng.randint(1, 64 * KiB), rng.randint(1, 2 * MiB))))
        if n <= 0:
            self._publish(rec)
            return 0
        rec.version += 1
        key = key_for(self.seed, rec.writer, rec.seq, rec.version)
        self.key_owner[key] = f"{rec.path} v{rec.version}"
        t = time.perf_counter()
        fd = os.open(self.root / rec.path, os.O_WRONLY | os.O_APPEND)
        try:
            self._write_all(fd, _pieces(rng, n), key, c.size, rng, st, append=True)
            synced = self._maybe_fsync(fd, rng, st, 0.3)
        finally:
            os.close(fd)
        st.add("append", n, time.perf_counter() - t)
        rec.content = c.write(c.size, c.size + n, key)
        rec.note(f"append [{c.size}, {c.size + n}) v{rec.version}{', fsync' if synced else ''}")
        self._publish(rec)
        return n

    def _truncate(self, rec: FileRec, rng: random.Random, st: Stats) -> int:
        self._withdraw(rec, "open")
        c = rec.content
        if c.size <= KiB:
            self._publish(rec)
            return 0
        n = rng.randint(KiB, c.size - 1)
        t = time.perf_counter()
        os.truncate(self.root / rec.path, n)
        st.add("truncate", 0, time.perf_counter() - t)
        rec.content = c.truncate(n)
        rec.note(f"truncate {c.size} -> {n}")
        self._publish(rec)
        return n - c.size

    def _rename(self, rec: FileRec, new: str, st: Stats) -> None:
        self._withdraw(rec, "opening")
        t = time.perf_counter()
        os.rename(self.root / rec.path, self.root / new)
        st.add("rename", 0, time.perf_counter() - t)
        rec.note(f"rename {rec.path} -> {new}")
        self.key_owner.update({k: f"{new} (was {rec.path})" for _, _, k in rec.content.ext})
        rec.path = new
        self._publish(rec)

    def _unlink(self, rec: FileRec, own: list[FileRec], st: Stats) -> int:
        self._withdraw(rec, "opening")
        own.remove(rec)
        t = time.perf_counter()
        os.unlink(self.root / rec.path)
        st.add("unlink", 0, time.perf_counter() - t)
        return rec.content.size

    # -- readers -------------------------------------------------------------
    def _reader(self, rid: int, st: Stats) -> None:
        rng = random.Random(f"{self.seed}-r{rid}")
        buf = bytearray(4 * MiB)
        who = f"reader {rid}"
        while not self.stop.is_set():
            got = self._pick(rng)
            if got is None:
                time.sleep(0.05)
                continue
            rec, path, content = got
            history = list(rec.history)
            r = rng.random()
            how = "whole" if r < 0.45 else ("range" if r < 0.8 else "mmap")
            fd = -1
            try:
                try:
                    fd = os.open(self.root / path, os.O_RDONLY)
                finally:
                    self._opened(rec)
                t = time.perf_counter()
                size = os.fstat(fd).st_size
                if size != content.size:
                    self.mismatch(who, f"{how}: fstat size {size}", path, content, 0, b"",
                                  0, history)
                    continue
                if rng.random() < self.drop_ratio:
                    # drop the file's pages (also other readers'): the daemon serves this read
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    how += "+dropped"
                if how.startswith("whole"):
                    n = self._read_whole(fd, content, path, rng, buf, who, history, how)
                    st.add("read_whole", n, time.perf_counter() - t)
                elif how.startswith("range"):
                    n = self._read_ranges(fd, content, path, rng, buf, who, history, how)
                    st.add("read_range", n, time.perf_counter() - t)
                else:
                    n = self._read_mmap(fd, content, path, rng, who, history, how)
                    st.add("read_mmap", n, time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                self.error(who, f"read_{how}", path, e)
                time.sleep(0.2)
            finally:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError as e:
                        self.error(who, "close", path, e)
                self._closed(rec)

    def _read_whole(self, fd, content, path, rng, buf, who, history, how) -> int:
        """Sequential read() (bytes) or preadv() (into buf) loops, random sizes."""
        pos = 0
        use_preadv = rng.random() < 0.5
        mv = memoryview(buf)
        while True:
            want = rng.choice((4 * KiB, 64 * KiB, 128 * KiB, 1 * MiB, 4 * MiB, rng.randint(1, 4 * MiB)))
            if use_preadv:
                k = os.preadv(fd, [mv[:want]], pos)
                data, n = buf, k
            else:
                data = os.read(fd, want)
                n = len(data)
            if n == 0:
                break
            bad = content.check(data, pos, n)
            if bad is not None:
                self.mismatch(who, f"{how} ({'preadv' if use_preadv else 'read'}, {want})", path,
                              content, pos, (data, n), bad, history)
                return pos
            pos += n
        if pos != content.size:
            self.mismatch(who, f"{how}: EOF at wrong size", path, content, pos, b"", 0, history)
        return pos

    def _read_ranges(self, fd, content, path, rng, buf, who, history, how) -> int:
        total = 0
        mv = memoryview(buf)
        for _ in range(rng.randint(1, 8)):
            size = content.size
            ln = rng.choice((rng.randint(1, 4 * KiB), rng.randint(1, 256 * KiB), rng.randint(1, 4 * MiB)))
            if rng.random() < 0.1:
                off = max(0, size - rng.randint(0, ln))        # a read across EOF
            else:
                off = rng.randrange(max(1, size))
            if rng.random() < 0.5:
                data = os.pread(fd, ln, off)
                n = len(data)
            else:
                n = os.preadv(fd, [mv[:ln]], off)
                data = buf
            bad = content.check(data, off, n) if n or off < size else None
            if n == 0 and off < size:
                bad = 0
            if bad is not None or (n < ln and off + n < size):
                self.mismatch(who, f"{how}: pread({ln}) at {off}", path, content, off, (data, n),
                              bad or 0, history)
                return total
            total += n
        return total

    def _read_mmap(self, fd, content, path, rng, who, history, how) -> int:
        size = content.size
        total = 0
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            if rng.random() < 0.4:
                ranges = [(0, size)]
            else:
                ranges = []
                for _ in range(rng.randint(1, 8)):
                    off = rng.randrange(size)
                    ranges.append((off, min(size - off, rng.randint(1, 2 * MiB))))
            for off, ln in ranges:
                data = mm[off:off + ln]
                bad = content.check(data, off, len(data))
                if bad is not None:
                    self.mismatch(who, f"{how} [{off}, {off + ln})", path, content, off, data, bad,
                                  history)
                    return total
                total += ln
        return total

    # -- RSS ----------------------------------------------------------------
    def _sampler(self) -> None:
        next_progress = self.progress_every
        while True:
            t = time.monotonic() - self.t0
            if self.pid:
                rss, _ = read_rss(self.pid)
                if rss is not None:
                    self.rss.append((round(t, 1), round(rss, 1)))
            if self.progress and t >= next_progress:
                next_progress += self.progress_every
                try:
                    self.progress(self.snapshot())
                except Exception:  # noqa: BLE001 - a progress printer never stops the load
                    pass
            if self._sampler_stop.wait(self.sample_interval):
                return

    def snapshot(self) -> dict:
        merged = Stats.merge(self.stats)
        t = time.monotonic() - self.t0
        return {"t": round(t, 1), "ops": {k: v[0] for k, v in sorted(merged.items())},
                "MB": round(sum(v[1] for v in merged.values()) / 1e6),
                "rss_mib": self.rss[-1][1] if self.rss else None,
                "files": len(self._pub), "errors": self.error_count,
                "mismatches": self.mismatch_count}

    # -- run ---------------------------------------------------------------
    def run(self) -> dict:
        """Run the load for `seconds`; returns {duration_s, ops: {kind: {ops,
        MB, MB_per_s, ops_per_s, mean_ms, max_ms}}, errors, error_count,
        mismatches, mismatch_count, rss_samples [(t, MiB)], peak_rss_mib,
        vmhwm_mib, files, live_MiB}."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self._sampler_stop = threading.Event()
        sampler = threading.Thread(target=self._sampler, name="rss-sampler", daemon=True)
        sampler.start()
        threads = []
        for i in range(self.writers):
            st = Stats()
            self.stats.append(st)
            threads.append(threading.Thread(target=self._guard, args=(self._writer, i, st, "writer"),
                                            name=f"writer-{i}", daemon=True))
        for i in range(self.readers):
            st = Stats()
            self.stats.append(st)
            threads.append(threading.Thread(target=self._guard, args=(self._reader, i, st, "reader"),
                                            name=f"reader-{i}", daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        t_stop = time.monotonic() - self.t0
        deadline = time.monotonic() + 300
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        for name in hung:
            self.error(name, "join", None, TimeoutError(f"{name} still running 300 s after stop"))
        duration = time.monotonic() - self.t0
        self._sampler_stop.set()
        sampler.join(5)
        merged = Stats.merge(self.stats)
        ops = {}
        for kind, (n, b, secs, mx) in sorted(merged.items()):
            ops[kind] = {"ops": n, "MB": round(b / 1e6, 1), "MB_per_s": round(b / 1e6 / duration, 2),
                         "ops_per_s": round(n / duration, 1),
                         "mean_ms": round(secs / n * 1e3, 2) if n else None,
                         "max_ms": round(mx * 1e3, 1)}
        _, hwm = read_rss(self.pid) if self.pid else (None, None)
        files = self.files()
        return {
            "duration_s": round(duration, 1), "load_s": round(t_stop, 1),
            "writers": self.writers, "readers": self.readers,
            "ops": ops,
            "read_MB_per_s": round(sum(v[1] for k, v in merged.items() if k.startswith("read")) / 1e6 / duration, 2),
            "write_MB_per_s": round(sum(v[1] for k, v in merged.items()
                                        if k in ("create", "overwrite", "append")) / 1e6 / duration, 2),
            "errors": self.errors, "error_count": self.error_count,
            "mismatches": self.mismatches, "mismatch_count": self.mismatch_count,
            "hung_threads": hung,
            "rss_samples": self.rss,
            "peak_rss_mib": max((r for _, r in self.rss), default=None),
            "vmhwm_mib": round(hwm, 1) if hwm else None,
            "files": len(files), "live_MiB": round(sum(r.content.size for r in files) / MiB, 1),
            "uncertain_paths": sorted(self.uncertain)[:50],
        }

    def _guard(self, fn, i, st, kind) -> None:
        try:
            fn(i, st)
        except Exception as e:  # noqa: BLE001 - a crashed thread is an error too
            self.error(f"{kind} {i}", "thread", None, e)

    # -- after the load --------------------------------------------------------
    def files(self) -> list[FileRec]:
        out = []
        for own in self._all.values():
            out += own
        return out

    def verify_all(self, root: str | Path | None = None, threads: int = 4,
                   read_size: int = 1 * MiB) -> dict:
        """Read every file that remains, whole, and check every byte; check
        that each writer's directory holds exactly its files and `tmp/`
        nothing (paths whose op failed excepted). Run it after the load
        (e.g. after a cold remount)."""
        root = Path(root) if root is not None else self.root
        recs = self.files()
        todo = collections.deque(recs)
        lock = threading.Lock()
        st = Stats()
        errors: list[dict] = []
        mism: list[dict] = []
        t0 = time.monotonic()

        def work():
            buf = bytearray(read_size)
            mv = memoryview(buf)
            while True:
                with lock:
                    if not todo:
                        return
                    rec = todo.popleft()
                t = time.perf_counter()
                try:
                    fd = os.open(root / rec.path, os.O_RDONLY)
                    try:
                        size = os.fstat(fd).st_size
                        pos, bad = 0, None
                        while True:
                            n = os.preadv(fd, [mv], pos)
                            if n == 0:
                                break
                            bad = rec.content.check(buf, pos, n)
                            if bad is not None:
                                break
                            pos += n
                    finally:
                        os.close(fd)
                    if bad is not None or pos != rec.content.size or size != rec.content.size:
                        at = pos + (bad or 0)
                        got = bytes(mv[bad:bad + 32]) if bad is not None else b""
                        src = self.whence(got)
                        with lock:
                            mism.append({"path": rec.path, "stat_size": size, "read_up_to": pos,
                                         "expected_size": rec.content.size,
                                         "first_bad_offset": at if bad is not None else None,
                                         "got": got.hex(),
                                         "expected": rec.content.expected(at, 32).hex(),
                                         "got_comes_from": src,
                                         "extents": [list(e) for e in rec.content.ext][:20],
                                         "history": rec.history})
                    st.add("verify", pos, time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        errors.append({"path": rec.path, "error": f"{type(e).__name__}: {e}"})

        ts = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        # listings
        listing = []
        want: dict[str, set[str]] = collections.defaultdict(set)
        for rec in recs:
            d, _, name = rec.path.rpartition("/")
            want[d].add(name)
        for d in [f"w{i}" for i in self._all] + ["tmp"]:
            try:
                have = set(os.listdir(root / d))
            except OSError as e:
                errors.append({"path": d, "error": f"listdir: {type(e).__name__}: {e}"})
                continue
            extra = {n for n in have - want[d] if f"{d}/{n}" not in self.uncertain}
            missing = want[d] - have
            if extra or missing:
                listing.append({"dir": d, "unexpected": sorted(extra)[:20],
                                "missing": sorted(missing)[:20]})
        secs = time.monotonic() - t0
        v = st.k.get("verify", [0, 0, 0.0, 0.0])
        return {"files": len(recs), "verified": v[0], "MB": round(v[1] / 1e6, 1),
                "seconds": round(secs, 1), "MB_per_s": round(v[1] / 1e6 / secs, 1) if secs else None,
                "errors": errors, "mismatches": mism, "listing_problems": listing}


def rss_table(samples: list[tuple[float, float]], every: float = 10.0) -> list[tuple[float, float, float]]:
    """[(t, RSS at t, max RSS since the previous row)]: the first sample, the
    first sample at or past each multiple of `every` seconds, the last one."""
    out = []
    edge, win_max = 0.0, 0.0
    for i, (t, r) in enumerate(samples):
        win_max = max(win_max, r)
        if t >= edge or i == len(samples) - 1:
            out.append((round(t, 1), r, win_max))
            win_max = 0.0
            while edge <= t:
                edge += every
    return out


def format_result(res: dict, verify: dict | None = None) -> str:
    """A short text report of a run."""
    lines = [f"{res['writers']} writers + {res['readers']} readers, {res['duration_s']} s "
             f"(load {res['load_s']} s); reads {res['read_MB_per_s']} MB/s, writes "
             f"{res['write_MB_per_s']} MB/s; files left {res['files']} ({res['live_MiB']} MiB)",
             f"{'kind':12s} {'ops':>8s} {'ops/s':>8s} {'MB':>9s} {'MB/s':>8s} {'mean ms':>9s} {'max ms':>9s}"]
    for kind, v in res["ops"].items():
        lines.append(f"{kind:12s} {v['ops']:8d} {v['ops_per_s']:8.1f} {v['MB']:9.1f} {v['MB_per_s']:8.2f} "
                     f"{v['mean_ms'] if v['mean_ms'] is not None else 0:9.2f} {v['max_ms']:9.1f}")
    lines.append(f"errors: {res['error_count']}, mismatches: {res['mismatch_count']}, "
                 f"peak RSS {res['peak_rss_mib']} MiB (VmHWM {res['vmhwm_mib']} MiB)")
    for e in res["errors"][:10]:
        lines.append(f"  error: {e}")
    for m in res["mismatches"][:5]:
        lines.append(f"  mismatch: {m}")
    if res["rss_samples"]:
        lines.append("RSS over time (MiB):   t  now  max-in-window")
        for t, now, mx in rss_table(res["rss_samples"]):
            lines.append(f"  {t:7.1f} s {now:7.1f} {mx:7.1f}")
    if verify is not None:
        lines.append(f"verify: {verify['verified']}/{verify['files']} files, {verify['MB']} MB in "
                     f"{verify['seconds']} s ({verify['MB_per_s']} MB/s); errors "
                     f"{len(verify['errors'])}, mismatches {len(verify['mismatches'])}, "
                     f"listing problems {len(verify['listing_problems'])}")
        for x in (verify["errors"][:5] + verify["mismatches"][:5] + verify["listing_problems"][:5]):
            lines.append(f"  {x}")
    return "\n".join(lines)
