"""S3 object store: block GETs and PUTs through obstore on worker threads
(s3blocks.py), everything else on aiobotocore, driven from trio through
trio-asyncio.

The caller's trio program must run inside `trio_asyncio.open_loop()` (see
`run_with_loop`). Each aiobotocore operation is one asyncio coroutine
(request plus body read) entered with one `aio_as_trio` hop, so per-request
overhead stays at a single trio<->asyncio switch.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import trio
import trio_asyncio
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError as BotoConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from .base import (
    AccessDenied,
    NoSuchBucket,
    NotFound,
    ObjectStorage,
    StorageError,
    Unreachable,
    check_key,
    check_range,
)
from .s3blocks import BlockAnswer, ObstoreBlocks, TransferFailed

# Error codes S3 (and compatible servers) use when the credentials or the
# permissions are the problem.
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
    "Forbidden",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}

_NO_SUCH_BUCKET = ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket")

# Failures while reading a GET body, after the response headers arrived.
# botocore's retry handler only covers the request/response-headers phase,
# so a connection that breaks mid-body would otherwise fail the read at once.
_BODY_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    FlexibleChecksumError,  # corrupted in transit: fetch again
    aiohttp.ClientError,  # e.g. ClientPayloadError on a truncated body
    asyncio.TimeoutError,
)

# AWS virtual-hosted style: bucket.s3.region.amazonaws.com (or s3-region, or
# no region at all for the legacy global endpoint).
_AWS_VHOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]+)\.s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com(?P<cn>\.cn)?$"
)


class _Deadline(Exception):
    """An operation ran past --io-timeout (raised inside the asyncio loop)."""


def _client_error(status: int, payload: bytes, op: str, attempt: int) -> ClientError:
    """A botocore ClientError for an S3 error answer, so one mapping serves both paths."""
    def tag(name: str) -> str:
        m = re.search(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()), payload or b"")
        return m.group(1).decode(errors="replace") if m else ""
    err = {"Code": tag("Code") or str(status), "Message": tag("Message")}
    meta = {"HTTPStatusCode": status, "RetryAttempts": attempt - 1}
    return ClientError({"Error": err, "ResponseMetadata": meta}, op)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1-based): the same
    truncated, jittered exponential backoff as botocore's retry modes."""
    return random.random() * min(2 ** (attempt - 1), 20)


def parse_s3_url(url: str) -> tuple[str, str, str | None, str]:
    """(endpoint_url, bucket, region or None, addressing_style) from a bucket URL."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise StorageError(
            f"invalid S3 bucket URL {url!r}: expected http(s)://host[:port]/bucket "
            "or https://bucket.s3.region.amazonaws.com"
        )
    if u.username or u.password:
        # Secrets in a URL end up in shell history, ps output and Redis.
        raise StorageError(
            "do not put credentials in the bucket URL; use AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or ~/.aws/credentials"
        )
    path = u.path.strip("/")
    m = _AWS_VHOST.match(u.hostname)
    if m and not path:
        region = m.group("region")
        if region in ("external-1",):  # s3-external-1 is us-east-1
            region = "us-east-1"
        host = f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"
        endpoint = f"{u.scheme}://{host}{m.group('cn') or ''}"
        return endpoint, m.group("bucket"), region, "virtual"
    if not path:
        raise StorageError(f"S3 URL {url!r} names no bucket: expected http(s)://host[:port]/bucket")
    if "/" in path:
        raise StorageError(f"S3 URL {url!r}: expected exactly one path component (the bucket)")
    try:
        port = f":{u.port}" if u.port else ""
    except ValueError:
        raise StorageError(f"invalid port in S3 URL {url!r}")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}{port}", path, None, "path"


def _body(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """A body botocore accepts (bytes, bytearray or a file), copying only when
    the memoryview is a slice: botocore rejects memoryview itself."""
    if isinstance(data, (bytes, bytearray)):
        return data
    mv = memoryview(data)
    obj = mv.obj
    if (
        isinstance(obj, (bytes, bytearray))
        and mv.contiguous
        and mv.nbytes == len(obj)
        and mv.format in ("B", "b", "c")
    ):
        return obj
    return mv.tobytes()


class S3Storage(ObjectStorage):
    # Keys per list page; S3's maximum. Tests lower it to exercise paging.
    page_size = 1000

    def __init__(
        self,
        bucket_url: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_connections: int = 64,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 5,
        op_timeout: float = 60,
    ):
        self.endpoint, self.bucket, region, style = parse_s3_url(bucket_url)
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.url = f"{self.endpoint}/{self.bucket}" if style == "path" else bucket_url.rstrip("/")
        if (access_key is None) != (secret_key is None):
            raise StorageError("give both an access key and a secret key, or neither (to use AWS_* env vars or ~/.aws)")
        self._access_key = access_key
        self._secret_key = secret_key
        self._max_attempts = max(1, max_attempts)
        # Bound of one operation, its retries included: past it the caller
        # gets Unreachable (EIO for a read; a write stages the block), so a
        # store that stalls never hangs a process for longer.
        self._op_timeout = op_timeout
        self._config = Config(
            region_name=self.region,
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore's standard mode: bounded retries with jittered
            # exponential backoff on 5xx, throttling, timeouts and
            # connection errors, plus a client-wide retry quota.
            # (total_max_attempts counts the first try; botocore's
            # "max_attempts" key would count only the retries.)
            retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
            # Over plain http botocore would SHA-256 every body to sign it
            # (~2 ms per 4 MiB block); the signature still covers the rest
            # of the request.
            s3={"addressing_style": style, "payload_signing_enabled": False},
            # Blocks carry their own xxhash64 in the disk cache, and the
            # transport is TCP: the per-request CRC32 of bodies (both ways)
            # only costs ~1 ms of CPU per 4 MiB block on the daemon's one
            # busy core. JuiceFS does not checksum bodies either.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_cm = None
        self._client = None
        # Block GETs and PUTs go through obstore (s3blocks.py) for path-style
        # URLs, the form every S3-compatible server takes; AWS's
        # virtual-hosted names keep the botocore path, as does anonymous access.
        self._blocks = ObstoreBlocks(
            self.endpoint, self.bucket, self.region, virtual_hosted=False,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_connections=max_connections) if style == "path" else None
        self._blocks_until = 0.0
        self._loop = None  # the trio_asyncio loop the client was made in
        self._client_lock = trio.Lock()

    # -- plumbing -----------------------------------------------------------

    async def _get_client(self):
        loop = trio_asyncio.current_loop.get()
        if self._client is not None and self._loop is loop:
            return self._client
        if loop is None:
            raise RuntimeError(
                "S3 storage must be used inside 'async with trio_asyncio.open_loop()' "
                "(or through jfscache.storage.run_with_loop)"
            )
        async with self._client_lock:
            if self._loop is not loop:
                # The client's connection pool belongs to the loop it was made
                # in; a store reused in a later trio_asyncio loop (e.g. two
                # run_with_loop calls) needs a fresh client. The old one's
                # loop is gone, so there is nothing left to close.
                self._client_cm = self._client = None
            if self._client is None:
                cm = get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=self.region,
                    aws_access_key_id=self._access_key,
                    aws_secret_access_key=self._secret_key,
                    config=self._config,
                )
                try:
                    client = await trio_asyncio.aio_as_trio(cm.__aenter__)()
                except (BotoCoreError, ClientError) as e:
                    raise self.translate(e, "connect") from e

                self._client_cm, self._client, self._loop = cm, client, loop
        return self._client

    async def _run(self, op: str, key: str | None, fn, *args):
        """Run the asyncio coroutine function fn(client, *args), mapping errors."""
        client = await self._get_client()
        try:
            return await trio_asyncio.aio_as_trio(self._aio_bounded)(fn, client, *args)
        except _Deadline:
            raise self._deadline(op, key) from None
        except (BotoCoreError, ClientError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            err = self.translate(e, op, key)
            # Some servers (SeaweedFS) answer a PUT into a missing bucket with
            # AccessDenied; "the bucket does not exist" is the helpful answer.
            if isinstance(err, AccessDenied) and await trio_asyncio.aio_as_trio(self._aio_bucket_missing)(client):
                err = self.translate(_NO_SUCH_BUCKET, op, key)
            raise err from e

    def _deadline(self, op: str, key: str | None) -> Unreachable:
        return Unreachable(f"S3 {op}{' ' + key if key else ''} at {self.url} did not complete within "
                           f"{self._op_timeout:g} s (--io-timeout)")

    async def _use_blocks(self) -> bool:
        """Whether block GETs and PUTs go through obstore. The credentials
        botocore resolved (arguments, environment, ~/.aws) are handed over,
        and read again every 5 minutes: temporary ones get refreshed."""
        if self._blocks is None:
            return False
        if time.monotonic() >= self._blocks_until:
            frozen = await self._run("connect", None, self._aio_credentials)
            if frozen is None:  # anonymous: botocore knows how to send those
                self._blocks = None
                return False
            self._blocks.set_credentials(frozen.access_key, frozen.secret_key, frozen.token)
            self._blocks_until = time.monotonic() + 300
        return True

    async def _blocks_op(self, op: str, key: str, fn, *args):
        """fn(*args), an ObstoreBlocks transfer, with the retries, deadline
        and error mapping of the botocore path."""
        with trio.move_on_after(self._op_timeout):
            for attempt in range(1, self._max_attempts + 1):
                try:
                    return await fn(*args)
                except BlockAnswer as e:
                    if op == "get" and e.status == 416:
                        return b""  # offset at/after the end: like reading past EOF
                    if (e.status < 500 and e.status != 429) or attempt == self._max_attempts:
                        name = "GetObject" if op == "get" else "PutObject"
                        err = self.translate(_client_error(e.status, e.payload, name, attempt), op, key)
                        if isinstance(err, AccessDenied) and await self._run(
                                "check bucket", self.bucket, self._aio_bucket_missing):
                            err = self.translate(_NO_SUCH_BUCKET, op, key)
                        raise err from None
                except TransferFailed as e:
                    if attempt == self._max_attempts:
                        if e.body:
                            raise Unreachable(f"S3 endpoint {self.endpoint} broke off {op} {key} "
                                              f"after {attempt} attempts: {e}") from None
                        raise Unreachable(f"S3 endpoint {self.endpoint} does not answer: {e}") from None
                await trio.sleep(backoff(attempt))
        raise self._deadline(op, key)

    def translate(self, e: BaseException, op: str, key: str | None = None) -> StorageError:
        """Map a botocore/aiohttp exception to a StorageError with a clear message."""
        what = f"{op} {key}" if key else op
        if isinstance(e, ClientError):
            err = e.response.get("Error", {}) or {}
            meta = e.response.get("ResponseMetadata", {}) or {}
            code = str(err.get("Code", "") or "")
            msg = str(err.get("Message", "") or "")
            status = meta.get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return NoSuchBucket(f"bucket '{self.bucket}' does not exist at {self.endpoint}")
            if code in _MISSING_CODES:
                return NotFound(f"object {key} not found in {self.url}")
            if code in _AUTH_CODES or status == 403:
                return AccessDenied(
                    f"S3 refused the credentials for {self.url}: {code or status}" + (f" ({msg})" if msg else "")
                )
            tries = meta.get("RetryAttempts")
            detail = f"{code}" + (f" ({msg})" if msg and msg != code else "")
            extra = f"HTTP {status}" + (f", {tries + 1} attempts" if tries else "")
            return StorageError(f"S3 {what} at {self.url} failed: {detail} [{extra}]")
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return AccessDenied(
                f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or configure ~/.aws/credentials"
            )
        if isinstance(e, SSLError):
            return Unreachable(f"TLS connection to S3 endpoint {self.endpoint} failed: {e}")
        if isinstance(e, FlexibleChecksumError):
            return StorageError(
                f"S3 {what} at {self.url}: data failed its checksum {self._max_attempts} times: {e}"
            )
        if isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError)):
            return Unreachable(f"S3 endpoint {self.endpoint} does not answer: {e}")
        if isinstance(e, (ResponseStreamingError, IncompleteReadError, aiohttp.ClientError)):
            return Unreachable(f"S3 endpoint {self.endpoint} broke off {what} after {self._max_attempts} attempts: {e}")
        if isinstance(e, (BotoConnectionError, HTTPClientError, asyncio.TimeoutError)):
            # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError
            # derive from the first; ReadTimeoutError, ConnectionClosedError
            # from the second.
            return Unreachable(f"S3 endpoint {self.endpoint} does not answer: {e or type(e).__name__}")
        return StorageError(f"S3 {what} at {self.url} failed: {e}")

    # -- asyncio side: each runs entirely in the asyncio loop ---------------

    async def _aio_bounded(self, fn, client, *args):
        deadline = asyncio.timeout(self._op_timeout)
        try:
            async with deadline:
                return await fn(client, *args)
        except TimeoutError:
            if deadline.expired():  # ours, not a socket timeout inside
                raise _Deadline() from None
            raise

    async def _aio_bucket_missing(self, client) -> bool:
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            return str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound")
        except (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError):
            pass
        return False

    async def _aio_credentials(self, client):
        creds = client._request_signer._credentials
        return None if creds is None else await creds.get_frozen_credentials()

    async def _aio_get(self, client, key: str, rng: str | None) -> bytes:
        kw = {"Bucket": self.bucket, "Key": key}
        if rng:
            kw["Range"] = rng
        for attempt in range(1, self._max_attempts + 1):
            try:
                resp = await client.get_object(**kw)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # offset at/after the end: like reading past EOF
                raise
            # `async with` closes the connection if the read fails or is
            # cancelled, so a half-read connection never returns to the pool.
            try:
                async with resp["Body"] as body:
                    return await body.read()
            except _BODY_ERRORS:
                if attempt == self._max_attempts:
                    raise
                await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    async def _aio_put(self, client, key: str, body) -> None:
        await client.put_object(Bucket=self.bucket, Key=key, Body=body)

    async def _aio_head(self, client, key: str) -> int | None:
        try:
            resp = await client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            # HEAD responses have no body, so a missing bucket also shows up
            # as a bare 404 here and cannot be told apart from a missing key.
            if str(e.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                return None
            raise
        return int(resp["ContentLength"])

    async def _aio_delete(self, client, key: str) -> None:
        await client.delete_object(Bucket=self.bucket, Key=key)

    async def _aio_delete_many(self, client, keys: list[str]) -> list[dict]:
        resp = await client.delete_objects(Bucket=self.bucket, Delete={
            "Objects": [{"Key": k} for k in keys], "Quiet": True})
        return [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]

    async def _aio_list_page(self, client, kw: dict) -> dict:
        return await client.list_objects_v2(**kw)

    async def _aio_create(self, client) -> bool:
        try:
            await client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kw = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await client.create_bucket(**kw)
            return True
        except ClientError as e:
            # Someone created it between our HEAD and CREATE.
            if e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise

    # -- the interface ------------------------------------------------------

    async def create(self) -> bool:
        return await self._run("create bucket", self.bucket, self._aio_create)

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        check_key(key)
        if await self._use_blocks():
            return await self._blocks_op("put", key, self._blocks.put, key, data)
        await self._run("put", key, self._aio_put, key, _body(data))

    async def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        check_key(key)
        check_range(off, limit)
        if limit == 0:
            return b""
        if limit > 0:
            rng = f"bytes={off}-{off + limit - 1}"
        elif off > 0:
            rng = f"bytes={off}-"
        else:
            rng = None
        if await self._use_blocks():
            return await self._blocks_op("get", key, self._blocks.get, key, off, off + limit if limit > 0 else None)
        return await self._run("get", key, self._aio_get, key, rng)

    async def head(self, key: str) -> int | None:
        check_key(key)
        return await self._run("head", key, self._aio_head, key)

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._run("delete", key, self._aio_delete, key)

    async def delete_many(self, keys: list[str]) -> None:
        """A DeleteObjects request per DELETE_BATCH keys (idempotent, so
        retried like the rest)."""
        for key in keys:
            check_key(key)
        for i in range(0, len(keys), self.DELETE_BATCH):
            batch = keys[i:i + self.DELETE_BATCH]
            failed = await self._run("delete", None, self._aio_delete_many, batch)
            if failed:
                e = failed[0]
                raise StorageError(f"S3 delete of {len(failed)} of {len(batch)} objects at {self.url} failed, "
                                   f"e.g. {e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".rstrip())

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[tuple[str, int]]:
        # One aio_as_trio hop per page; the generator itself is trio-side, so
        # callers simply `async for` over it (no async-iterator adapter needed).
        kw = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if start_after:
            kw["StartAfter"] = start_after
        while True:
            page = await self._run("list", prefix or None, self._aio_list_page, kw)
            for obj in page.get("Contents", ()):
                yield obj["Key"], int(obj["Size"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kw = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size, "ContinuationToken": token}

    async def check(self) -> None:
        # Ask for the bucket first: some servers (SeaweedFS) silently create a
        # missing bucket on PUT, which would hide a bucket deleted after format.
        if await self._run("check bucket", self.bucket, self._aio_bucket_missing):
            raise NoSuchBucket(f"bucket '{self.bucket}' does not exist at {self.endpoint}")
        await super().check()

    async def close(self) -> None:
        cm, self._client_cm, self._client = self._client_cm, None, None
        if cm is not None and self._loop is trio_asyncio.current_loop.get():
            await trio_asyncio.aio_as_trio(cm.__aexit__)(None, None, None)
