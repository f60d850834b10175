"""The write buffer's error reporting: every flush that waited for a failed
commit reports it. (Found with Sentinel failovers: an fsync returned success
because a concurrent flush of the same file had taken the error first.)"""
from __future__ import annotations

import errno

import trio

from jfscache.vfs.writer import FileWriter, WriteBudget


class FailingMeta:
    def __init__(self):
        self.next = 0

    async def new_slice_id(self):
        self.next += 1
        return self.next

    async def write_slice(self, ino, indx, s):
        await trio.sleep(0.05)
        raise OSError(errno.EIO, "the commit's reply was lost")


class Cache:
    async def put(self, key, data):
        pass


def test_every_waiting_flush_reports_a_failed_commit():
    async def main():
        async with trio.open_nursery() as n:
            fw = FileWriter(7, meta=FailingMeta(), cache=Cache(), volume="v", bs=4 << 20,
                            budget=WriteBudget(1 << 30), upload_limiter=trio.CapacityLimiter(4), nursery=n,
                            on_commit=lambda *a: None)
            await fw.write(0, b"x" * 1000)
            results = []

            async def flush():
                try:
                    await fw.flush()
                    results.append("ok")
                except OSError as e:
                    results.append(e.errno)

            async with trio.open_nursery() as flushes:   # an fsync and a read's flush, at once
                flushes.start_soon(flush)
                flushes.start_soon(flush)
            assert results == [errno.EIO, errno.EIO]
            await fw.flush()   # reported: a later flush (nothing new) succeeds
            await fw.write(0, b"y")   # and writing goes on
    trio.run(main)
