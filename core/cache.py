"""One least-recently-used cache, bounded by a count of items or by bytes.

Every step that keeps decoded images, prepared matcher inputs or descriptors between pairs uses it:
pairs come in an order that revisits images (``pipeline.pairs`` sorts them for that), so a small LRU
keeps most hits at a bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

Value = TypeVar("Value")


def nbytes_of(value: Any) -> int:
    """Bytes held by a value: ``.nbytes`` of arrays and tensors, summed over tuples, lists and dicts."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    size = getattr(value, "nbytes", None)
    if size is None and hasattr(value, "element_size"):  # a torch tensor
        size = value.element_size() * value.nelement()
    return int(size or 0)


class LRUCache(Generic[Value]):
    """A map that drops its least recently used items beyond ``max_items`` or ``max_bytes``.

    ``max_bytes`` counts :func:`nbytes_of` (or ``size_of``) of each value; ``keep_at_least`` items are kept
    whatever their size (two images of a pair must both stay while it is matched). ``hits`` and ``misses``
    count :meth:`get` calls, for the benchmark.
    """

    def __init__(
        self,
        max_items: int | None = None,
        max_bytes: int | None = None,
        size_of: Callable[[Any], int] = nbytes_of,
        keep_at_least: int = 1,
    ) -> None:
        if max_items is None and max_bytes is None:
            raise ValueError("an LRU cache needs max_items or max_bytes")
        self.max_items = None if max_items is None else max(1, max_items)
        self.max_bytes = max_bytes
        self._size_of, self._keep = size_of, max(1, keep_at_least)
        self._items: OrderedDict[Hashable, Value] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, default: Any = None) -> Value | Any:
        """The value (now most recently used), or ``default``."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return default

    def put(self, key: Hashable, value: Value) -> None:
        """Store ``value`` as the most recently used item, then evict down to the budget."""
        if key in self._items:
            self.bytes -= self._sizes.pop(key)
        self._items[key] = value
        self._items.move_to_end(key)
        if self.max_bytes is not None:
            self._sizes[key] = self._size_of(value)
            self.bytes += self._sizes[key]
        while len(self._items) > self._keep and self._over_budget():
            old, _ = self._items.popitem(last=False)
            self.bytes -= self._sizes.pop(old, 0)

    def get_or_create(self, key: Hashable, create: Callable[[], Value]) -> Value:
        """The cached value, or ``create()`` stored and returned."""
        if key in self._items:
            return self.get(key)
        self.misses += 1
        value = create()
        self.put(key, value)
        return value

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.bytes = 0

    def _over_budget(self) -> bool:
        if self.max_items is not None and len(self._items) > self.max_items:
            return True
        return self.max_bytes is not None and self.bytes > self.max_bytes
