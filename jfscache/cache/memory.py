"""The memory tier: immutable blocks by key, bounded by bytes, least recently used out first."""
from __future__ import annotations

from collections import OrderedDict


class MemoryCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def peek(self, key: str) -> bytes | None:
        """A block without making it recently used."""
        return self._items.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._items[key] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, victim = self._items.popitem(last=False)
            self.used -= len(victim)

    def drop(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)

    def __len__(self) -> int:
        return len(self._items)
