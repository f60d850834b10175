"""The object-store interface and its errors.

Every layer above talks to storage only through `ObjectStorage`, and every
failure it can report is a `StorageError` whose message is one line a user can
act on (the CLI prints it without a traceback).
"""
from __future__ import annotations

import secrets
from typing import AsyncIterator


class StorageError(Exception):
    """Any failure of the object store, with a one-line, human-clear message."""

    def __init__(self, message: str):
        # Messages often embed text from servers or libraries; keep them on
        # one line so log lines and CLI output stay readable.
        super().__init__(" ".join(str(message).split()))


class NoSuchBucket(StorageError):
    """The bucket (S3) or directory (file store) does not exist."""


class AccessDenied(StorageError):
    """Credentials are missing, wrong, or not allowed to do this."""


class Unreachable(StorageError):
    """The endpoint does not answer (refused, DNS, timeout) after retries."""


class NotFound(StorageError):
    """The object does not exist."""


class ObjectStorage:
    """A flat key -> bytes store; keys are '/'-separated strings.

    Implementations must be usable from trio tasks concurrently.
    """

    url: str  # for logs and status; never contains secrets

    async def create(self) -> bool:
        """Create the bucket/directory if missing; True if it was created."""
        raise NotImplementedError

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        """The object's bytes [off, off+limit); limit < 0 means to the end.

        Reading past the end returns fewer (or zero) bytes, as a file would.
        Raises NotFound if the object does not exist.
        """
        raise NotImplementedError

    async def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""
        raise NotImplementedError

    # The most keys one batch delete request takes (S3's DeleteObjects limit).
    DELETE_BATCH = 1000

    async def delete_many(self, keys: list[str]) -> None:
        """Delete the objects (missing ones are not an error). Stores with a
        batch call override it: a deleted data set is one request per
        DELETE_BATCH objects instead of one per object."""
        for key in keys:
            await self.delete(key)

    def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[tuple[str, int]]:
        """(key, size) for keys starting with prefix and > start_after, sorted."""
        raise NotImplementedError

    async def check(self) -> None:
        """Put, get and delete a small object; raise a StorageError if any fails."""
        key = "jfscache-check-" + secrets.token_hex(8)
        data = b"jfscache storage check " + key.encode()
        await self.put(key, data)
        try:
            if await self.get(key) != data:
                raise StorageError(f"{self.url} returned different data than was written")
        finally:
            await self.delete(key)

    async def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def check_key(key: str) -> None:
    """Refuse keys no store can hold the same way (shared by all stores, so a
    key that works on the file store in tests also works on S3)."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")


def check_range(off: int, limit: int) -> None:
    if off < 0:
        raise ValueError(f"negative offset {off}")
