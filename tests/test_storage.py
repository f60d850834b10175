"""Tests of jfscache.storage: the local-directory store and the S3 store
(against moto's threaded server, with a small fault-injecting HTTP proxy in
front of it for retries). No pytest-trio: each test runs its async body with
run_with_loop (trio + a trio-asyncio loop, as the daemon does)."""
from __future__ import annotations

import http.client
import os
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from jfscache.storage import (
    AccessDenied,
    NoSuchBucket,
    NotFound,
    StorageError,
    Unreachable,
    create_storage,
    run_with_loop,
)
from jfscache.storage.s3 import S3Storage, parse_s3_url

CREDS = {"access_key": "testing", "secret_key": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class FaultProxy:
    """An HTTP proxy to moto that misbehaves on demand: each entry of
    `faults` is consumed by one request, "500" answers HTTP 500 InternalError,
    "403" answers AccessDenied,
    "truncate" forwards but cuts the response body in half and closes the
    connection; an empty queue forwards faithfully."""

    def __init__(self, upstream_port: int):
        self.faults: list[str] = []
        self.requests = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy.lock:
                    proxy.requests += 1
                    fault = proxy.faults.pop(0) if proxy.faults else None
                if fault in ("500", "403"):
                    code = "InternalError" if fault == "500" else "AccessDenied"
                    err = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=10)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                # HEAD: the object's length, as the upstream said; else ours.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if fault == "truncate" and self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def inject(self, *faults: str) -> None:
        with self.lock:
            self.faults = list(faults)
            self.requests = 0

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    """Retry at once: these tests check what is retried, not the backoff
    (up to 1 s, 2 s, 4 s... with jitter, which would make them slow)."""
    from botocore.retries.standard import ExponentialBackoff

    import jfscache.storage.s3 as s3mod

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.01)
    monkeypatch.setattr(s3mod, "backoff", lambda attempt: 0.01)


@pytest.fixture(scope="module")
def proxy(moto_url):
    p = FaultProxy(int(moto_url.rsplit(":", 1)[1]))
    try:
        yield p
    finally:
        p.close()


def bucket_name() -> str:
    return "b-" + uuid.uuid4().hex[:12]


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A created, empty store of each kind; tests run `store` factories
    inside run_with_loop, so this yields a factory, not an instance."""
    if request.param == "file":
        url = str(tmp_path / "store")
        make = lambda: create_storage("file", url)  # noqa: E731
    else:
        moto = request.getfixturevalue("moto_url")
        url = f"{moto}/{bucket_name()}"
        make = lambda: create_storage("s3", url, **CREDS, max_attempts=2)  # noqa: E731

    async def init():
        s = make()
        try:
            assert await s.create() is True
        finally:
            await s.close()

    run_with_loop(init)
    return make


def run(make, fn):
    """Run fn(store) under trio + trio-asyncio, closing the store afterwards."""

    async def main():
        s = make()
        try:
            return await fn(s)
        finally:
            await s.close()

    return run_with_loop(main)


async def collect(it):
    return [x async for x in it]


# -- both kinds --------------------------------------------------------------


def test_delete_many(store):
    """One request per batch on S3 (DeleteObjects): missing keys are fine,
    and other keys stay."""
    async def body(s):
        keys = [f"vol/chunks/0/0/{i}_0_3" for i in range(30)]
        for k in keys:
            await s.put(k, b"abc")
        await s.delete_many(keys[:20] + ["never/existed"])
        assert [await s.head(k) for k in keys] == [None] * 20 + [3] * 10
        await s.delete_many(keys[:20])   # again: nothing left to delete
        await s.delete_many([])
        s.DELETE_BATCH = 3  # more keys than a request takes: split
        await s.delete_many(keys[20:])
        assert [await s.head(k) for k in keys[20:]] == [None] * 10
    run(store, body)


def test_put_get_head_delete(store):
    async def body(s):
        data = os.urandom(1 << 20) + b"tail"
        await s.put("vol/chunks/0/0/1_0_1048580", data)
        assert await s.get("vol/chunks/0/0/1_0_1048580") == data
        assert await s.head("vol/chunks/0/0/1_0_1048580") == len(data)
        # overwrite replaces the whole object
        await s.put("vol/chunks/0/0/1_0_1048580", b"short")
        assert await s.get("vol/chunks/0/0/1_0_1048580") == b"short"
        await s.delete("vol/chunks/0/0/1_0_1048580")
        assert await s.head("vol/chunks/0/0/1_0_1048580") is None
        await s.delete("vol/chunks/0/0/1_0_1048580")  # idempotent
        await s.delete("never/existed")
        # empty objects exist and read back empty
        await s.put("empty", b"")
        assert await s.head("empty") == 0
        assert await s.get("empty") == b""

    run(store, body)


def test_ranged_get(store):
    async def body(s):
        data = bytes(range(256)) * 64
        await s.put("r", data)
        assert await s.get("r", 0, 10) == data[:10]
        assert await s.get("r", 100) == data[100:]
        assert await s.get("r", 100, 1000) == data[100:1100]
        assert await s.get("r", len(data) - 5, 100) == data[-5:]  # short at the end
        assert await s.get("r", len(data)) == b""  # at the end, like a file
        assert await s.get("r", len(data) + 10, 3) == b""
        assert await s.get("r", 5, 0) == b""

    run(store, body)


def test_memoryview_put(store):
    async def body(s):
        buf = bytearray(os.urandom(4096))
        await s.put("whole", memoryview(buf))
        await s.put("slice", memoryview(buf)[1000:3000])
        await s.put("ba", buf)
        assert await s.get("whole") == bytes(buf)
        assert await s.get("slice") == bytes(buf[1000:3000])
        assert await s.get("ba") == bytes(buf)

    run(store, body)


def test_not_found(store):
    async def body(s):
        with pytest.raises(NotFound):
            await s.get("missing/key")
        with pytest.raises(NotFound):
            await s.get("missing/key", 10, 10)
        assert await s.head("missing/key") is None

    run(store, body)


def test_create_is_idempotent(store):
    async def body(s):
        assert await s.create() is False
        await s.check()

    run(store, body)


def test_list_sorted_prefix_start_after(store):
    # Names chosen so that directory order differs from key order: "-" and
    # "." sort before "/", so "a-c" < "a.b" < "a/b/c" as keys. (No key may
    # also be a "directory" of others: the file store cannot hold both.)
    keys = ["a-c", "a.b", "a/b/c", "a/ba", "b", "a/a/z/z", "ab"]

    async def body(s):
        for i, k in enumerate(keys):
            await s.put(k, b"x" * i)
        sizes = {k: i for i, k in enumerate(keys)}
        everything = await collect(s.list())
        assert [k for k, _ in everything] == sorted(keys)
        assert all(size == sizes[k] for k, size in everything)
        assert [k for k, _ in await collect(s.list("a/"))] == ["a/a/z/z", "a/b/c", "a/ba"]
        assert [k for k, _ in await collect(s.list("a/b"))] == ["a/b/c", "a/ba"]
        assert [k for k, _ in await collect(s.list("", "a/a/z/z"))] == ["a/b/c", "a/ba", "ab", "b"]
        assert [k for k, _ in await collect(s.list("", "a/"))] == ["a/a/z/z", "a/b/c", "a/ba", "ab", "b"]
        assert [k for k, _ in await collect(s.list("a", "a/b/c"))] == ["a/ba", "ab"]
        assert await collect(s.list("zzz")) == []

    run(store, body)


def test_list_pagination(store):
    keys = [f"vol/chunks/0/{i // 10}/{i}_0_3" for i in range(53)]

    async def body(s):
        if isinstance(s, S3Storage):
            s.page_size = 7  # force many pages (S3's page is 1000 keys)
        async with trio.open_nursery() as n:
            for k in keys:
                n.start_soon(s.put, k, b"abc")
        got = await collect(s.list("vol/"))
        assert [k for k, _ in got] == sorted(keys)
        assert {size for _, size in got} == {3}
        after = sorted(keys)[20]
        assert [k for k, _ in await collect(s.list("vol/", after))] == sorted(keys)[21:]

    run(store, body)


def test_concurrent_large_objects(store):
    """16 tasks sharing one store (one S3 client, one pool) at once."""

    async def body(s):
        blobs = {f"big/{i}": os.urandom(256 * 1024 + i) for i in range(16)}
        async with trio.open_nursery() as n:
            for k, v in blobs.items():
                n.start_soon(s.put, k, v)
        got = {}

        async def fetch(k):
            got[k] = await s.get(k)

        async with trio.open_nursery() as n:
            for k in blobs:
                n.start_soon(fetch, k)
        assert got == blobs

    run(store, body)


def test_invalid_keys(store):
    async def body(s):
        for bad in ("", "/abs", "a//b", "a/../b", "dir/", "./x"):
            with pytest.raises(ValueError):
                await s.put(bad, b"x")

    run(store, body)


# -- file store --------------------------------------------------------------


def test_file_store_layout_and_atomicity(tmp_path):
    root = tmp_path / "fs"
    make = lambda: create_storage("file", f"file://{root}")  # noqa: E731

    async def body(s):
        assert s.url == f"file://{root}"
        assert await s.create() is True
        assert (root.stat().st_mode & 0o777) == 0o700
        await s.put("v/chunks/0/0/7_0_5", b"hello")
        assert (root / "v/chunks/0/0/7_0_5").read_bytes() == b"hello"
        # a leftover temporary file (crash mid-write) is not an object
        (root / "v/chunks/0/0/.8_0_5.jfstmp-deadbeef").write_bytes(b"partial")
        assert await collect(s.list()) == [("v/chunks/0/0/7_0_5", 5)]
        assert sorted(os.listdir(root / "v/chunks/0/0")) == [".8_0_5.jfstmp-deadbeef", "7_0_5"]
        assert await s.create() is False

    run(make, body)


def test_file_store_missing_dir(tmp_path):
    make = lambda: create_storage("file", str(tmp_path / "nope"))  # noqa: E731

    async def body(s):
        with pytest.raises(NoSuchBucket, match="does not exist"):
            await s.put("a/b", b"x")
        with pytest.raises(NoSuchBucket):
            await s.get("a/b")
        with pytest.raises(NoSuchBucket):
            await collect(s.list())
        with pytest.raises(NoSuchBucket):
            await s.check()
        assert not (tmp_path / "nope").exists()  # put must not create the store

    run(make, body)


def test_file_store_not_a_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    make = lambda: create_storage("file", str(tmp_path / "f"))  # noqa: E731

    async def body(s):
        with pytest.raises(StorageError, match="not a directory"):
            await s.create()

    run(make, body)


# -- S3 specifics ------------------------------------------------------------


def test_s3_url_parsing():
    assert parse_s3_url("http://127.0.0.1:8333/mybucket") == ("http://127.0.0.1:8333", "mybucket", None, "path")
    assert parse_s3_url("https://s3.example.com/b/") == ("https://s3.example.com", "b", None, "path")
    assert parse_s3_url("https://data.s3.eu-west-1.amazonaws.com") == (
        "https://s3.eu-west-1.amazonaws.com", "data", "eu-west-1", "virtual")
    assert parse_s3_url("https://my.data.s3.amazonaws.com/") == ("https://s3.amazonaws.com", "my.data", None, "virtual")
    for bad in ("ftp://h/b", "http://h:1/", "http://h/b/extra", "s3://b", "http://k:s@h/b", "127.0.0.1:8333/b"):
        with pytest.raises(StorageError):
            parse_s3_url(bad)


def test_s3_region_and_url(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert create_storage("s3", "http://h:1/b").region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert create_storage("s3", "http://h:1/b").region == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "ap-east-1")
    s = create_storage("s3", "http://h:1/b", **CREDS)
    assert s.region == "ap-east-1"
    assert s.url == "http://h:1/b" and "testing" not in repr(s)
    assert create_storage("s3", "https://data.s3.eu-west-1.amazonaws.com").region == "eu-west-1"
    with pytest.raises(StorageError):
        create_storage("s3", "http://h:1/b", access_key="only")
    with pytest.raises(StorageError, match="unknown storage type"):
        create_storage("gcs", "x")


def test_s3_one_client_reused(moto_url):
    url = f"{moto_url}/{bucket_name()}"

    async def body(s):
        await s.create()
        client = s._client
        await s.put("k", b"v")
        assert await s.get("k") == b"v"
        assert s._client is client

    run(lambda: create_storage("s3", url, **CREDS), body)


def test_s3_store_survives_loop_change(moto_url):
    """A store used by two separate run_with_loop calls (as a CLI might)
    makes a fresh client for the second loop."""
    s = create_storage("s3", f"{moto_url}/{bucket_name()}", **CREDS)

    async def first():
        await s.create()
        await s.put("k", b"v")
        return s._client

    async def second():
        try:
            assert await s.get("k") == b"v"
            assert await s.head("k") == 1  # (block GETs do not need the client)
            return s._client
        finally:
            await s.close()

    c1 = run_with_loop(first)  # not closed: its loop just ends
    c2 = run_with_loop(second)
    assert c1 is not c2


def test_s3_no_credentials(moto_url, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probe

    async def body(s):
        with pytest.raises(AccessDenied, match="no S3 credentials .* AWS_ACCESS_KEY_ID"):
            await s.put("k", b"v")

    run(lambda: create_storage("s3", f"{moto_url}/{bucket_name()}"), body)

    # and the standard environment variables are picked up
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")

    async def body2(s):
        assert await s.create() is True
        await s.check()

    run(lambda: create_storage("s3", f"{moto_url}/{bucket_name()}"), body2)


def test_s3_no_such_bucket(moto_url):
    url = f"{moto_url}/{bucket_name()}"

    async def body(s):
        for op in (s.put("k", b"v"), s.get("k"), s.delete("k"), collect(s.list()), s.check()):
            with pytest.raises(NoSuchBucket, match=r"bucket 'b-\w+' does not exist at http://127\.0\.0\.1:\d+$"):
                await op
        # HEAD has no error body: a missing bucket looks like a missing key
        assert await s.head("k") is None

    run(lambda: create_storage("s3", url, **CREDS), body)


def test_s3_access_denied_moto(moto_url):
    """moto checks credentials once told to (its /moto-api/reset-auth)."""
    url = f"{moto_url}/{bucket_name()}"
    host = moto_url.split("//")[1]

    def set_auth(count: str):
        conn = http.client.HTTPConnection(host, timeout=5)
        conn.request("POST", "/moto-api/reset-auth", body=count.encode())
        assert conn.getresponse().status == 200
        conn.close()

    async def body(s):
        with pytest.raises(AccessDenied, match="S3 refused the credentials for .*InvalidAccessKeyId"):
            await s.check()
        with pytest.raises(AccessDenied):
            await s.get("k")

    async def body_bad_secret(s):
        with pytest.raises(AccessDenied, match="S3 refused the credentials for .*SignatureDoesNotMatch"):
            await s.put("k", b"v")

    import boto3

    # Two unauthenticated calls to make a real IAM user with a key, then
    # every request must be signed by a known key.
    set_auth("2")
    try:
        iam = boto3.client("iam", endpoint_url=moto_url, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="jfs")
        key = iam.create_access_key(UserName="jfs")["AccessKey"]["AccessKeyId"]
        run(lambda: create_storage("s3", url, access_key="AKIAWRONGWRONGWRONG1", secret_key="x"), body)
        run(lambda: create_storage("s3", url, access_key=key, secret_key="not-the-secret"), body_bad_secret)
    finally:
        set_auth("inf")


def _client_error(code: str, status: int, message: str = "", op: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 4 if status >= 500 else 0}},
        op,
    )


def test_s3_access_denied_for_missing_bucket(proxy):
    """SeaweedFS answers a PUT into a missing bucket with 403 AccessDenied;
    the store then asks whether the bucket exists and says so instead."""
    missing = f"http://127.0.0.1:{proxy.port}/{bucket_name()}"
    existing = f"http://127.0.0.1:{proxy.port}/{bucket_name()}"

    async def body(s):
        proxy.inject("403")
        with pytest.raises(NoSuchBucket):
            await s.put("k", b"v")

    async def body2(s):
        await s.create()
        proxy.inject("403")
        with pytest.raises(AccessDenied, match="AccessDenied \\(injected\\)"):
            await s.put("k", b"v")

    run(lambda: create_storage("s3", missing, **CREDS), body)
    run(lambda: create_storage("s3", existing, **CREDS), body2)


def test_s3_error_mapping():
    s = create_storage("s3", "http://127.0.0.1:9/bkt", **CREDS)
    cases = [
        (_client_error("NoSuchBucket", 404), NoSuchBucket, "bucket 'bkt' does not exist at http://127.0.0.1:9"),
        (_client_error("NoSuchKey", 404), NotFound, "k not found"),
        (_client_error("404", 404, op="HeadObject"), NotFound, "k not found"),
        (_client_error("InvalidAccessKeyId", 403, "no such key id"), AccessDenied,
         "S3 refused the credentials for http://127.0.0.1:9/bkt: InvalidAccessKeyId"),
        (_client_error("SignatureDoesNotMatch", 403), AccessDenied, "SignatureDoesNotMatch"),
        (_client_error("AccessDenied", 403, "Access Denied"), AccessDenied, "AccessDenied (Access Denied)"),
        (_client_error("403", 403, op="HeadObject"), AccessDenied, "403"),
        (_client_error("WeirdPolicyThing", 403), AccessDenied, "WeirdPolicyThing"),
        (_client_error("InternalError", 500, "We encountered\nan internal error"), StorageError,
         "S3 put k at http://127.0.0.1:9/bkt failed: InternalError (We encountered an internal error) [HTTP 500, 5 attempts]"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/k"), Unreachable,
         "S3 endpoint http://127.0.0.1:9 does not answer"),
        (NoCredentialsError(), AccessDenied, "no S3 credentials"),
    ]
    for exc, cls, text in cases:
        err = s.translate(exc, "put", "k")
        assert type(err) is cls, (exc, err)
        assert text in str(err), str(err)
        assert "\n" not in str(err)


def test_s3_unreachable_closed_port():
    port = free_port()  # nothing listens there: connection refused
    make = lambda: create_storage(  # noqa: E731
        "s3", f"http://127.0.0.1:{port}/bkt", **CREDS, connect_timeout=1, read_timeout=1, max_attempts=2)

    async def body(s):
        with trio.fail_after(10):
            with pytest.raises(Unreachable, match=rf"S3 endpoint http://127\.0\.0\.1:{port} does not answer"):
                await s.put("k", b"v")
            with pytest.raises(Unreachable):
                await s.create()

    run(make, body)


@pytest.fixture
def silent_port():
    """A listening socket that never accepts: the kernel completes the TCP
    handshake from its backlog, then nobody ever answers the request."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    yield lsock.getsockname()[1]
    lsock.close()


def test_s3_unreachable_read_timeout(silent_port):
    port = silent_port
    make = lambda: create_storage(  # noqa: E731
        "s3", f"http://127.0.0.1:{port}/bkt", **CREDS, connect_timeout=1, read_timeout=0.3, max_attempts=2)

    async def body(s):
        with trio.fail_after(10):
            with pytest.raises(Unreachable, match="does not answer"):
                await s.get("k")

    run(make, body)


def test_s3_operation_deadline_bounds_the_retries(silent_port):
    """--io-timeout: however many retries are left, an operation ends (with
    Unreachable, naming the option) once its deadline passes."""
    port = silent_port
    make = lambda: create_storage(  # noqa: E731
        "s3", f"http://127.0.0.1:{port}/bkt", **CREDS, read_timeout=30, max_attempts=50, op_timeout=0.5)

    async def body(s):
        with trio.fail_after(10):
            for op in (s.get("k"), s.put("k", b"v")):
                with pytest.raises(Unreachable, match=r"did not complete within 0.5 s \(--io-timeout\)"):
                    await op

    run(make, body)


def test_s3_trio_cancellation(silent_port):
    """A trio cancel scope interrupts a request waiting inside asyncio."""
    port = silent_port
    make = lambda: create_storage("s3", f"http://127.0.0.1:{port}/bkt", **CREDS, read_timeout=30)  # noqa: E731

    async def body(s):
        with trio.fail_after(10):
            with trio.move_on_after(0.3) as scope:
                await s.get("k")
        assert scope.cancelled_caught

    run(make, body)


def test_s3_retries_5xx(proxy, fast_retries):
    url = f"http://127.0.0.1:{proxy.port}/{bucket_name()}"
    make = lambda: create_storage("s3", url, **CREDS, max_attempts=3)  # noqa: E731

    async def body(s):
        assert await s.create() is True
        proxy.inject("500", "500")
        await s.put("k", b"payload")  # third attempt succeeds
        assert proxy.requests == 3
        proxy.inject("500", "500")
        assert await s.get("k") == b"payload"
        assert proxy.requests == 3
        proxy.inject("500", "500")
        assert await s.head("k") == 7
        # max_attempts exhausted: a clean StorageError naming the failure
        proxy.inject("500", "500", "500", "500")
        with pytest.raises(StorageError, match=r"S3 put k .* failed: InternalError \(injected\) \[HTTP 500, 3 attempts\]") as ei:
            await s.put("k", b"other")
        assert not isinstance(ei.value, (NotFound, AccessDenied, NoSuchBucket, Unreachable))
        assert proxy.requests == 3
        proxy.inject()
        assert await s.get("k") == b"payload"  # the failed put changed nothing

    run(make, body)


def test_s3_retries_truncated_body(proxy, fast_retries):
    """A GET whose body breaks off mid-way is retried by the store itself
    (botocore's retries end when the response headers arrive)."""
    url = f"http://127.0.0.1:{proxy.port}/{bucket_name()}"
    make = lambda: create_storage("s3", url, **CREDS, max_attempts=3)  # noqa: E731
    data = os.urandom(200_000)

    async def body(s):
        await s.create()
        await s.put("k", data)
        proxy.inject("truncate")
        assert await s.get("k") == data
        assert proxy.requests == 2
        proxy.inject("truncate", "truncate")
        assert await s.get("k", 1000, 5000) == data[1000:6000]
        proxy.inject("truncate", "truncate", "truncate")
        with pytest.raises(Unreachable, match="broke off get k"):
            await s.get("k")
        assert proxy.requests == 3
        proxy.inject()
        assert await s.get("k") == data  # the pool recovered

    run(make, body)


def test_s3_needs_trio_asyncio_loop(moto_url):
    s = create_storage("s3", f"{moto_url}/whatever", **CREDS)
    with pytest.raises(RuntimeError, match="open_loop"):
        trio.run(s.head, "k")


def test_run_with_loop_returns_value():
    async def f(a, b):
        await trio.sleep(0)
        return a + b

    assert run_with_loop(f, 2, 3) == 5
