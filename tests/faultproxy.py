"""An HTTP proxy in front of the S3 server that breaks a share of requests
the ways object stores and networks do: 500, 503 SlowDown, a reset
connection, a truncated body, a stall. Each request is relayed on a fresh
upstream connection (`Connection: close`), so bodies need no parsing beyond
the request's Content-Length."""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

KINDS = ("500", "slowdown", "reset", "truncate", "stall")


def _read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v.strip())
    return 0


class FaultProxy:
    def __init__(self, upstream_port: int, rate: float = 0.0, seed: int = 1, stall: float = 2.0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate, self.stall = rate, stall
        self.kinds = KINDS  # the faults to inject, each in turn
        self.methods: set[bytes] | None = None  # fault only these HTTP methods (None: all)
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _fault(self, method: bytes) -> str | None:
        with self._lock:
            self.requests += 1
            if self.methods is not None and method not in self.methods:
                return None
            if self.rng.random() >= self.rate:
                return None
            kind = self.kinds[sum(self.faults.values()) % len(self.kinds)]   # each kind in turn
            self.faults[kind] += 1
            return kind

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                got = _read_head(conn, buf)
                if got is None:
                    return
                head, rest = got
                n = _content_length(head)
                while len(rest) < n:
                    data = conn.recv(1 << 20)
                    if not data:
                        return
                    rest += data
                body, buf = rest[:n], rest[n:]
                kind = self._fault(head.split(b" ", 1)[0])
                if kind in ("500", "slowdown"):
                    code, msg = ("500 Internal Server Error", "InternalError") if kind == "500" else \
                        ("503 Slow Down", "SlowDown")
                    xml = f"<?xml version='1.0'?><Error><Code>{msg}</Code><Message>injected</Message></Error>"
                    conn.sendall(f"HTTP/1.1 {code}\r\nContent-Type: application/xml\r\nContent-Length: "
                                 f"{len(xml)}\r\n\r\n{xml}".encode())
                    continue
                if kind == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if kind == "stall":
                    time.sleep(self.stall)
                lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
                up = socket.create_connection(self.upstream, timeout=60)
                try:
                    up.sendall(b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body)
                    response = b""
                    while data := up.recv(1 << 20):
                        response += data
                finally:
                    up.close()
                if kind == "truncate":
                    rhead, _, rbody = response.partition(b"\r\n\r\n")
                    if rbody:
                        conn.sendall(rhead + b"\r\n\r\n" + rbody[:len(rbody) // 2])
                    return
                conn.sendall(response)
                if b"connection: close" in response.split(b"\r\n\r\n", 1)[0].lower():
                    return
        except OSError:
            return
        finally:
            conn.close()
