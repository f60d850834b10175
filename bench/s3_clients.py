"""Block GET/PUT throughput and CPU of the S3 client paths, from trio,
against a SeaweedFS S3 server on loopback (started here):

  store       jfscache's S3Storage (block GETs and PUTs through obstore on a
              trio worker thread: jfscache/storage/s3blocks.py)
  ob_future   obstore's asyncio futures, under trio-asyncio
  botocore    aiobotocore get_object / put_object (the control path's client)

    .venv/bin/python -m bench.s3_clients [--rounds 3]

CPU is this process's user+system time (the Rust threads included) per GiB
moved; SeaweedFS's own CPU is not counted. Quote medians: the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import obstore
import trio
import trio_asyncio
from obstore.store import S3Store

from jfscache.storage.s3 import S3Storage

from .services import Procs, SeaweedS3

BUCKET = "clients"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _one(how: str, st: S3Storage, ob: S3Store, client, key: str, data: bytes | None):
    if how == "store":
        return await (st.get(key) if data is None else st.put(key, data))
    if how == "ob_future":
        if data is None:
            r = await trio_asyncio.aio_as_trio(obstore.get_async)(ob, key)
            return await trio_asyncio.aio_as_trio(r.bytes_async)()
        return await trio_asyncio.aio_as_trio(obstore.put_async)(ob, key, data, use_multipart=False)

    async def boto():
        if data is None:
            resp = await client.get_object(Bucket=BUCKET, Key=key)
            async with resp["Body"] as body:
                return await body.read()
        return await client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return await trio_asyncio.aio_as_trio(boto)()


async def _measure(how, st, ob, client, keys, data, conc) -> tuple[float, float]:
    todo = list(keys)
    moved = 0

    async def worker():
        nonlocal moved
        while todo:
            k = todo.pop()
            got = await _one(how, st, ob, client, k + ("-put" if data else ""), data)
            moved += len(data) if data else len(memoryview(got))
    t, c = time.perf_counter(), _cpu()
    async with trio.open_nursery() as n:
        for _ in range(conc):
            n.start_soon(worker)
    dt, dc = time.perf_counter() - t, _cpu() - c
    return moved / dt / 1e6, dc / (moved / 2**30)


async def _main(sw: SeaweedS3, rounds: int) -> None:
    st = S3Storage(sw.bucket_url(BUCKET), access_key=sw.ACCESS_KEY, secret_key=sw.SECRET_KEY)
    ob = S3Store(BUCKET, endpoint=sw.endpoint, access_key_id=sw.ACCESS_KEY, secret_access_key=sw.SECRET_KEY,
                 region="us-east-1", virtual_hosted_style_request=False, unsigned_payload=True,
                 client_options={"allow_http": True})
    from aiobotocore.session import get_session
    cm = get_session().create_client("s3", endpoint_url=sw.endpoint, region_name="us-east-1",
                                     aws_access_key_id=sw.ACCESS_KEY, aws_secret_access_key=sw.SECRET_KEY)
    client = await trio_asyncio.aio_as_trio(cm.__aenter__)()
    try:
        for size, conc, n in ((4 << 20, 8, 64), (64 << 10, 4, 600)):
            data = os.urandom(size)
            keys = [f"s{size}/{i}" for i in range(n)]
            async with trio.open_nursery() as nur:
                for k in keys:
                    nur.start_soon(st.put, k, data)
            for op in ("GET", "PUT"):
                for how in ("store", "ob_future", "botocore"):
                    got = [await _measure(how, st, ob, client, keys, data if op == "PUT" else None, conc)
                           for _ in range(rounds)]
                    print(f"{op} {size >> 10:>5} KiB x{conc} {how:10s} "
                          f"{statistics.median(g[0] for g in got):7.0f} MB/s "
                          f"(min {min(g[0] for g in got):.0f}, max {max(g[0] for g in got):.0f})  "
                          f"{statistics.median(g[1] for g in got):5.2f} s CPU/GiB", flush=True)
    finally:
        await trio_asyncio.aio_as_trio(cm.__aexit__)(None, None, None)
        await st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3clients-", dir="/var/tmp"))
    procs = Procs(work)
    try:
        sw = SeaweedS3(procs, work, str(Path(os.sys.executable).parent / "weed"))
        sw.start([BUCKET])
        trio_asyncio.run(_main, sw, args.rounds)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
