"""Block GETs and PUTs through obstore (Rust `object_store`), on worker threads.

Why: the daemon is one Python thread, CPU-bound moving bytes between the
store and FUSE on 2 cores it shares with everything else. obstore signs,
sends and receives in Rust with the GIL released, and hands the body back as
one buffer (no copy). Measured here against SeaweedFS on loopback, from trio
(bench/ANALYSIS.md, "S3 client"): 4 MiB GETs, 8 at once, 1.6 x the throughput
of aiohttp + botocore's signer at half the CPU per GiB; 64 KiB GETs 1.5 x;
PUTs 1.1-1.4 x at 0.6 x the CPU. A blocking call on a trio worker thread
measured better than obstore's asyncio futures under trio-asyncio.

obstore's own retries are off: the retry policy (attempts, jittered back-off,
which answers are retried) and the error mapping stay those of the rest of
the S3 store, which gets every failure as a botocore ClientError.
"""
from __future__ import annotations

import re

import obstore
import trio
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

# obstore reports an S3 error answer inside its message, e.g. "Server returned
# non-2xx status code: 503 Service Unavailable: <?xml ...><Code>SlowDown</Code>".
_STATUS = re.compile(r"status code: (\d{3})")
_BODY = re.compile(r"(<\?xml.*?</Error>|<Error>.*?</Error>)", re.S)


class BlockAnswer(Exception):
    """The store answered with an HTTP error: status and XML body."""

    def __init__(self, status: int, payload: bytes):
        super().__init__(status)
        self.status, self.payload = status, payload


class TransferFailed(Exception):
    """No HTTP answer (connection refused, reset, timed out), or a body cut
    short (`body`)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.body = "body error" in text


def _classify(e: Exception) -> Exception:
    text = str(e).split("\n\nDebug source:", 1)[0]
    m = _STATUS.search(text)
    if m is None:
        return TransferFailed(text)
    body = _BODY.search(text)
    return BlockAnswer(int(m.group(1)), body.group(1).encode() if body else b"")


class ObstoreBlocks:
    """GET and PUT of whole blocks (or ranges) for one bucket."""

    def __init__(self, endpoint: str, bucket: str, region: str, *, virtual_hosted: bool,
                 connect_timeout: float, read_timeout: float, max_connections: int):
        self._args = dict(
            endpoint=endpoint, region=region, virtual_hosted_style_request=virtual_hosted,
            # Body signing off, as on the botocore path (payload_signing_enabled=False).
            unsigned_payload=True,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "connect_timeout": f"{connect_timeout:g}s",
                # A whole request (a stalled server included) ends by this;
                # the caller's --io-timeout bounds the operation as a whole.
                "timeout": f"{read_timeout:g}s",
                "pool_max_idle_per_host": str(max_connections),
            },
            retry_config={"max_retries": 0},
        )
        self._bucket = bucket
        self._store: S3Store | None = None
        self._creds: tuple | None = None
        # Threads parked in obstore calls, bounded apart from trio's default
        # limiter so disk-tier threads never wait behind network transfers.
        self._limiter = trio.CapacityLimiter(max_connections)

    def set_credentials(self, access_key: str, secret_key: str, token: str | None) -> None:
        """(Re)build the client when the credentials changed (temporary ones rotate)."""
        creds = (access_key, secret_key, token)
        if creds != self._creds:
            extra = {"session_token": token} if token else {}
            self._store = S3Store(self._bucket, access_key_id=access_key, secret_access_key=secret_key,
                                  **extra, **self._args)
            self._creds = creds

    @property
    def ready(self) -> bool:
        return self._store is not None

    async def _call(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self._limiter)
        except (ObstoreError, OSError) as e:  # a 404 comes as FileNotFoundError
            raise _classify(e) from None

    async def get(self, key: str, start: int = 0, end: int | None = None):
        """The object's bytes [start, end) (end None: to its end), as a buffer.
        A range starting at or past the end raises BlockAnswer(416)."""
        store = self._store
        if start == 0 and end is None:
            return await self._call(lambda: obstore.get(store, key).bytes())
        if end is None:
            return await self._call(lambda: obstore.get(store, key, options={"range": {"offset": start}}).bytes())
        return await self._call(lambda: obstore.get_range(store, key, start=start, end=end))

    async def put(self, key: str, data) -> None:
        store = self._store
        # One request per block: a multipart upload would cost three.
        await self._call(lambda: obstore.put(store, key, data, use_multipart=False))
