"""Object stores: S3 (aiobotocore under trio-asyncio) and a local directory.

    store = create_storage("s3", "http://127.0.0.1:8333/mybucket")
    await store.put(key, data)        # inside trio_asyncio.open_loop()
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio
import trio_asyncio

from .base import AccessDenied, NoSuchBucket, NotFound, ObjectStorage, StorageError, Unreachable

__all__ = [
    "AccessDenied",
    "NoSuchBucket",
    "NotFound",
    "ObjectStorage",
    "StorageError",
    "Unreachable",
    "create_storage",
    "run_with_loop",
]


def create_storage(
    kind: str,
    bucket: str,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    max_connections: int = 64,
    connect_timeout: float = 5,
    read_timeout: float = 30,
    max_attempts: int = 5,
    op_timeout: float = 60,
) -> ObjectStorage:
    """A store of the given kind ("s3" or "file"); no I/O happens here."""
    kind = kind.lower()
    if kind == "file":
        from .file import FileStorage

        return FileStorage(bucket)
    if kind == "s3":
        # Imported lazily: aiobotocore is slow to import and the file store
        # (and layers that only pass a store around) do not need it.
        from .s3 import S3Storage

        return S3Storage(
            bucket,
            access_key=access_key,
            secret_key=secret_key,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            op_timeout=op_timeout,
        )
    raise StorageError(f"unknown storage type {kind!r} (expected 's3' or 'file')")


def run_with_loop(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """trio.run(async_fn, *args) inside a trio-asyncio loop, for synchronous
    callers such as the CLI's format command."""

    async def main():
        async with trio_asyncio.open_loop():
            return await async_fn(*args)

    return trio.run(main)
