"""An object store in a local directory: each key is a file, '/' in keys
makes subdirectories. Used for tests and single-node volumes."""
from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import AsyncIterator

import trio

from ..fsutil import write_atomic
from .base import NoSuchBucket, NotFound, ObjectStorage, StorageError, check_key, check_range

# Temporary files live next to their final name (so os.replace is atomic) and
# carry this marker, so list() can skip them.
_TMP_MARK = ".jfstmp-"


class FileStorage(ObjectStorage):
    def __init__(self, root: str):
        if root.startswith("file://"):
            root = root[len("file://"):]
        if not root:
            raise StorageError("file store needs a directory path, e.g. file:///var/jfs")
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root

    def _path(self, key: str) -> str:
        check_key(key)
        return os.path.join(self.root, key)

    def _missing(self, key: str) -> StorageError:
        """Explain an ENOENT: the whole store is missing, or just the object."""
        if not os.path.isdir(self.root):
            return NoSuchBucket(f"directory {self.root} does not exist (run format first?)")
        return NotFound(f"object {key} not found in {self.url}")

    def _oserror(self, exc: OSError, what: str) -> StorageError:
        return StorageError(f"{what} in {self.url} failed: {exc.strerror or exc}")

    async def create(self) -> bool:
        try:
            os.makedirs(self.root, mode=0o700)
            return True
        except FileExistsError:
            if not os.path.isdir(self.root):
                raise StorageError(f"{self.root} exists and is not a directory")
            return False
        except OSError as e:
            raise self._oserror(e, "creating the directory")

    def _put_sync(self, path: str, key: str, data) -> None:
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, "." + os.path.basename(path) + _TMP_MARK + secrets.token_hex(4))
        # fsync: the block is committed to metadata right after put returns;
        # without it a crash could leave an empty file behind the rename,
        # i.e. a file pointing to lost data.
        try:
            write_atomic(path, tmp, data, fsync=True)
        except FileNotFoundError:
            # Creating the parent directories of the store itself would hide
            # a wrong path (or an unformatted volume): S3 fails the same way.
            if not os.path.isdir(self.root):
                raise NoSuchBucket(f"directory {self.root} does not exist (run format first?)")
            os.makedirs(parent, mode=0o700, exist_ok=True)
            write_atomic(path, tmp, data, fsync=True)

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        try:
            await trio.to_thread.run_sync(self._put_sync, path, key, data)
        except OSError as e:
            raise self._oserror(e, f"writing {key}")

    def _get_sync(self, path: str, off: int, limit: int) -> bytes:
        with open(path, "rb") as f:
            if off:
                f.seek(off)
            # BufferedReader.read(n) loops until n bytes or end of file, and
            # reads large requests straight into the result (no extra copy).
            return f.read(limit if limit >= 0 else None)

    async def get(self, key: str, off: int = 0, limit: int = -1) -> bytes:
        path = self._path(key)
        check_range(off, limit)
        if limit == 0:
            return b""
        try:
            return await trio.to_thread.run_sync(self._get_sync, path, off, limit)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key)
        except IsADirectoryError:
            raise NotFound(f"object {key} not found in {self.url}")
        except OSError as e:
            raise self._oserror(e, f"reading {key}")

    async def head(self, key: str) -> int | None:
        # stat and unlink are metadata-only and fast on a local disk, so they
        # run inline rather than paying a thread hop.
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(self.root):
                raise NoSuchBucket(f"directory {self.root} does not exist (run format first?)")
            return None
        except OSError as e:
            raise self._oserror(e, f"stat of {key}")
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    async def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(self.root):
                raise NoSuchBucket(f"directory {self.root} does not exist (run format first?)")
        except IsADirectoryError:
            pass  # a "directory" key is a prefix, not an object
        except OSError as e:
            if e.errno == errno.EPERM and os.path.isdir(self._path(key)):
                return  # unlink(dir) is EPERM on some systems (macOS)
            raise self._oserror(e, f"deleting {key}")

    @staticmethod
    def _scan(path: str) -> list[tuple[str, bool, int]]:
        """Entries of one directory as (name, is_dir, size), in key order."""
        out = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    if _TMP_MARK in e.name:
                        continue
                    try:
                        if e.is_dir(follow_symlinks=False):
                            out.append((e.name, True, 0))
                        elif e.is_file(follow_symlinks=False):
                            out.append((e.name, False, e.stat(follow_symlinks=False).st_size))
                    except FileNotFoundError:
                        continue  # deleted while listing
        except (FileNotFoundError, NotADirectoryError):
            return []
        # Sorting a directory's "name/" for subdirectories and "name" for
        # files yields global lexicographic key order: every key under
        # directory d starts with "d/", so it sorts exactly where "d/" does.
        out.sort(key=lambda t: t[0] + "/" if t[1] else t[0])
        return out

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[tuple[str, int]]:
        if not os.path.isdir(self.root):
            raise NoSuchBucket(f"directory {self.root} does not exist (run format first?)")
        # Depth-first walk, one directory per thread hop, so a huge store is
        # streamed instead of loaded into memory.
        async def walk(rel: str):
            entries = await trio.to_thread.run_sync(self._scan, os.path.join(self.root, rel))
            for name, is_dir, size in entries:
                key = rel + name
                if is_dir:
                    sub = key + "/"
                    # Skip subtrees that cannot hold a key matching the prefix,
                    # or whose keys all sort at or before start_after.
                    if not (sub.startswith(prefix) or prefix.startswith(sub)):
                        continue
                    if sub <= start_after and not start_after.startswith(sub):
                        continue
                    async for item in walk(sub):
                        yield item
                elif key.startswith(prefix) and key > start_after:
                    yield key, size

        try:
            async for item in walk(""):
                yield item
        except OSError as e:
            raise self._oserror(e, "listing")

