"""Virtual files under the mount's root, kept out of the namespace code:

  .stats     the mount's metrics as JSON (jfscache/metrics.py; `jfscache stats`, `jfscache profile`)
  .control   a request channel: `jfscache warmup` writes one JSON request and
             reads JSON lines back (progress about twice a second, then the
             final report), as `juicefs warmup` talks to its .control file;
             other layers register further requests in `vfs.controls` (one
             answer line each), e.g. the cache group's weight change

Both are answered with direct I/O, so the kernel neither caches them nor
stops reading at their (nominal) size.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field

import trio

from ..meta.engine import ROOT_INODE, Attr
from . import fill

log = logging.getLogger(__name__)

STATS_INODE = 0x7FFF_FFFF_0000_0001
CONTROL_INODE = 0x7FFF_FFFF_0000_0002
NAMES = {b".stats": STATS_INODE, b".control": CONTROL_INODE}
PROGRESS_EVERY = 0.5  # seconds between progress lines while a job runs
MAX_REQUEST = 1 << 20


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class _Job:
    progress: fill.Progress
    background: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class ControlState:
    """One open handle of a virtual file."""
    out: bytearray = field(default_factory=bytearray)  # what reads return
    request: bytearray = field(default_factory=bytearray)
    job: _Job | None = None
    closed: bool = False  # no more output will come


class Internal:
    def __init__(self, vfs):
        self.vfs = vfs
        self.jobs: list[_Job] = []  # warmups running (jfscache_warmup_blocks_*)

    def lookup(self, parent: int, name: bytes) -> int | None:
        return NAMES.get(name) if parent == self.vfs.root else None

    @staticmethod
    def attr(ino: int) -> Attr:
        now = time.time_ns()
        mode = 0o444 if ino == STATS_INODE else 0o666
        return Attr(ino, "f", mode, 0, 0, 0, 1, 1 << 20, now, now, now, ROOT_INODE, False)

    def open(self, ino: int) -> ControlState:
        st = ControlState()
        if ino == STATS_INODE:
            st.out += self.vfs.metrics.json()
            st.closed = True
        return st

    async def read(self, ino: int, st: ControlState, off: int, size: int) -> bytes:
        if off >= len(st.out) and not st.closed and st.job is not None:
            job = st.job
            with trio.move_on_after(PROGRESS_EVERY):
                await job.done.wait()
            st.out += (json.dumps(job.progress.report()) + "\n").encode()
            if job.done.is_set():
                st.closed = True
        return bytes(st.out[off:off + size])

    async def write(self, ino: int, st: ControlState, off: int, data) -> int:
        if ino != CONTROL_INODE:
            raise _err(errno.EACCES)
        if st.job is not None or st.closed or len(st.request) + len(data) > MAX_REQUEST:
            raise _err(errno.EINVAL)
        st.request += data
        if not st.request.endswith(b"\n"):
            return len(data)  # the request is one line; wait for its end
        try:
            req = json.loads(st.request)
            handler = self.vfs.controls.get(req.get("op"))
            if handler is not None:
                st.out += (json.dumps(await handler(req)) + "\n").encode()
                st.closed = True
            else:
                self._start(st, req)
        except (ValueError, TypeError, KeyError) as e:
            st.out += (json.dumps({"error": f"bad control request: {e}"}) + "\n").encode()
            st.closed = True
        return len(data)

    def _start(self, st: ControlState, req: dict) -> None:
        if req.get("op") != "warmup":
            raise ValueError(f"unknown op {req.get('op')!r}")
        mode = req.get("mode", "warm")
        if mode not in fill.MODES:
            raise ValueError(f"unknown mode {mode!r}")
        targets = [(str(p), int(i)) for p, i in req["targets"]]
        threads = int(req.get("threads", 50))
        if not 1 <= threads <= 1024:
            raise ValueError("threads must be between 1 and 1024")
        job = st.job = _Job(fill.Progress(mode), bool(req.get("background")))
        v = self.vfs
        v.nursery.start_soon(self._run, job, targets, mode, threads)
        # The first line says the job was taken, so a --background caller can go.
        st.out += (json.dumps({"accepted": True, "mode": mode}) + "\n").encode()

    async def _run(self, job: _Job, targets, mode: str, threads: int) -> None:
        v = self.vfs
        self.jobs.append(job)
        try:
            with job.scope:
                await fill.run(v.meta, v.warmer, v.volume, v.bs, targets, mode, threads, job.progress)
        finally:
            self.jobs.remove(job)
            job.progress.finished = True
            job.done.set()

    def warmups(self) -> list[fill.Progress]:
        """The progress of the running warmup jobs."""
        return [j.progress for j in tuple(self.jobs)]

    def release(self, st: ControlState) -> None:
        # A warmup in the foreground stops with its caller (Ctrl-C); one
        # started with --background goes on.
        if st.job is not None and not st.job.background:
            st.job.scope.cancel()
