"""Throughput of the cache-group peer protocol (jfscache.group.peer) on loopback.

    python -m bench.peer_bench [--seconds 5] [--clients 4] [--block-mib 4] [--rounds 2]
                               [--client-procs 1] [--range-kib 0]

One server process serves in-memory blocks (so no disk or S3 is measured);
``--clients`` concurrent requesters, spread over ``--client-procs`` processes,
each loop PeerClient.get() over the blocks for ``--seconds``. Prints, per
round, MB/s (10^6 bytes) and the CPU seconds per GiB of the server process and
of the client process(es) (user + system, from time.process_time), then one
JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import trio

from jfscache.group.peer import PeerClient, open_peer_server

SECRET = b"peer-bench-secret"
GiB = 1 << 30


class MemorySource:
    def __init__(self, blocks: dict[str, bytes]):
        self.blocks = blocks

    async def local(self, key):
        return self.blocks.get(key)

    async def fill(self, key):
        return self.blocks[key]

    def contains(self, key):
        return key in self.blocks

    def evict(self, key):
        pass


def make_blocks(n: int, size: int) -> dict[str, bytes]:
    return {f"chunks/0/{i}_0_{size}": os.urandom(size) for i in range(n)}


# -- server process: prints "PORT n", then answers "start"/"stop" lines on stdin

async def serve(args) -> None:
    blocks = make_blocks(args.blocks, args.block_mib << 20)
    async with open_peer_server("127.0.0.1", 0, SECRET, MemorySource(blocks)) as server:
        print("PORT", server.port, flush=True)
        cpu0 = bytes0 = req0 = 0
        while True:
            line = (await trio.to_thread.run_sync(sys.stdin.readline)).strip()
            if line == "start":
                cpu0, bytes0, req0 = time.process_time(), server.served.bytes, server.served.requests
                print("OK", flush=True)
            elif line == "stop":
                print(json.dumps({"cpu": time.process_time() - cpu0,
                                  "bytes": server.served.bytes - bytes0,
                                  "requests": server.served.requests - req0,
                                  "errors": server.served.errors}), flush=True)
            else:
                return


# -- client side

async def fetch_loop(args, port: int, tasks: int) -> dict:
    size = args.block_mib << 20
    keys = list(make_keys(args.blocks, size))
    client = PeerClient(SECRET, timeout=30, max_idle_per_peer=tasks)
    addr = f"127.0.0.1:{port}"
    length = args.range_kib << 10 if args.range_kib else -1
    total = 0
    n = 0

    async def worker(i: int, deadline: float):
        nonlocal total, n
        j = i
        while trio.current_time() < deadline:
            data = await client.get(addr, keys[j % len(keys)], 0, length)
            total += len(data)
            n += 1
            j += tasks

    # one untimed request per task opens the connections
    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(client.get, addr, keys[i % len(keys)])
    cpu0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        deadline = trio.current_time() + args.seconds
        for i in range(tasks):
            nursery.start_soon(worker, i, deadline)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await client.aclose()
    return {"bytes": total, "requests": n, "seconds": seconds, "cpu": cpu}


def make_keys(n: int, size: int):
    return (f"chunks/0/{i}_0_{size}" for i in range(n))


def client_main(args) -> None:
    # a client process: waits for "go" so every process starts together
    sys.stdin.readline()
    print(json.dumps(trio.run(fetch_loop, args, args.port, args.tasks)), flush=True)


def run_round(args, port: int, server: subprocess.Popen) -> dict:
    procs = max(1, args.client_procs)
    per_proc = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
    children = []
    if procs > 1:
        for tasks in per_proc:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "bench.peer_bench", "--client", "--port", str(port),
                 "--tasks", str(tasks), *common_args(args)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        time.sleep(1.0)         # let them import
    server.stdin.write("start\n")
    server.stdin.flush()
    assert server.stdout.readline().strip() == "OK"
    if procs > 1:
        for c in children:
            c.stdin.write("go\n")
            c.stdin.flush()
        parts = [json.loads(c.stdout.readline()) for c in children]
        for c in children:
            c.wait()
        res = {"bytes": sum(p["bytes"] for p in parts), "requests": sum(p["requests"] for p in parts),
               "seconds": max(p["seconds"] for p in parts), "cpu": sum(p["cpu"] for p in parts)}
    else:
        res = trio.run(fetch_loop, args, port, args.clients)
    server.stdin.write("stop\n")
    server.stdin.flush()
    srv = json.loads(server.stdout.readline())
    gib = res["bytes"] / GiB
    return {
        "MB_per_s": round(res["bytes"] / res["seconds"] / 1e6, 1),
        "requests": res["requests"],
        "seconds": round(res["seconds"], 2),
        "client_cpu_s_per_GiB": round(res["cpu"] / gib, 3),
        "server_cpu_s_per_GiB": round(srv["cpu"] / gib, 3),
        "server_errors": srv["errors"],
    }


def common_args(args) -> list[str]:
    return ["--seconds", str(args.seconds), "--block-mib", str(args.block_mib),
            "--blocks", str(args.blocks), "--range-kib", str(args.range_kib)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4, help="concurrent requesters (connections)")
    ap.add_argument("--client-procs", type=int, default=1, help="processes the requesters run in")
    ap.add_argument("--block-mib", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=8, help="distinct blocks the server holds")
    ap.add_argument("--range-kib", type=int, default=0, help="get this many KiB of each block (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tasks", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        trio.run(serve, args)
        return
    if args.client:
        client_main(args)
        return

    server = subprocess.Popen(
        [sys.executable, "-m", "bench.peer_bench", "--serve", *common_args(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        word, port = server.stdout.readline().split()
        assert word == "PORT"
        rounds = []
        for r in range(args.rounds):
            res = run_round(args, int(port), server)
            rounds.append(res)
            print(f"round {r + 1}: {res['MB_per_s']:8.1f} MB/s  "
                  f"server {res['server_cpu_s_per_GiB']:.3f} s CPU/GiB  "
                  f"client {res['client_cpu_s_per_GiB']:.3f} s CPU/GiB  "
                  f"({res['requests']} gets in {res['seconds']} s)", flush=True)
        print(json.dumps({"clients": args.clients, "client_procs": args.client_procs,
                          "block_mib": args.block_mib, "range_kib": args.range_kib,
                          "cores": os.cpu_count(), "rounds": rounds}))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
