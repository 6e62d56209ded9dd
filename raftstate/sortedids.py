"""Device ids in sorted order: O(log n) inserts, and frozen copies in O(n/B).

Theory of operation. Listing by prefix needs the ids in order; one sorted
``list`` makes every new device an O(n) ``insort`` (at a million devices
inserts fell from 36 k/s to 6.6 k/s). :class:`SortedIds` keeps the ids in
blocks, each a sorted ``list`` of at most ``2 * block`` ids, plus the list of
each block's first id:

* ``add``/``discard``: a bisect over the block heads (O(log n/B)), then an
  insert or delete inside one block (O(B) ``memmove``). A block that grows
  past ``2 * block`` is split in two; an emptied block is dropped.
* ``iter_from(key)``: ids ``>= key`` (or ``> key``) in order, block by block.
* ``freeze()``: the current blocks as a list of lists that will never change
  (``O(n/B)``: block references only). After a freeze, the first change to a
  block copies it first (copy-on-write), so frozen blocks stay as they were
  while the table goes on changing. The snapshot writer walks a frozen copy on
  another thread while the tick thread applies new entries.

Writers: one thread (the tick thread). Readers on other threads call
``iter_from``/``window`` under the owner's lock (``DeviceTable`` holds one).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

DEFAULT_BLOCK = 512


class SortedIds:
    """A sorted set of strings, in blocks."""

    def __init__(self, ids: Iterable[str] = (), *, block: int = DEFAULT_BLOCK) -> None:
        """``ids`` must be sorted and unique (``from_sorted`` checks)."""
        self._block = block
        self._blocks: list[list[str]] = []
        self._heads: list[str] = []
        self._len = 0
        #: ``id()`` of blocks created since the last freeze (safe to mutate).
        self._owned: set[int] = set()
        self._frozen = False
        items = list(ids)
        for start in range(0, len(items), block):
            self._append_block(items[start : start + block])

    @classmethod
    def from_sorted(cls, ids: list[str], *, block: int = DEFAULT_BLOCK) -> SortedIds:
        """Build from an ascending list of unique ids; raises ``ValueError``
        if it is not one."""
        for a, b in zip(ids, ids[1:], strict=False):
            if not a < b:
                raise ValueError(f"ids are not strictly ascending at {a!r}, {b!r}")
        return cls(ids, block=block)

    def _append_block(self, chunk: list[str]) -> None:
        self._blocks.append(chunk)
        self._heads.append(chunk[0])
        self._owned.add(id(chunk))
        self._len += len(chunk)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        for block in list(self._blocks):
            yield from block

    def _writable(self, i: int) -> list[str]:
        block = self._blocks[i]
        if self._frozen and id(block) not in self._owned:
            block = list(block)
            self._blocks[i] = block
            self._owned.add(id(block))
        return block

    def add(self, device_id: str) -> bool:
        """Insert; False if already present."""
        if not self._blocks:
            self._append_block([device_id])
            return True
        i = max(bisect.bisect_right(self._heads, device_id) - 1, 0)
        current = self._blocks[i]
        pos = bisect.bisect_left(current, device_id)
        if pos < len(current) and current[pos] == device_id:
            return False
        block = self._writable(i)
        block.insert(pos, device_id)
        self._heads[i] = block[0]
        self._len += 1
        if len(block) > 2 * self._block:
            half = len(block) // 2
            upper = block[half:]
            lower = block[:half]
            self._owned.discard(id(block))
            self._blocks[i : i + 1] = [lower, upper]
            self._heads[i : i + 1] = [lower[0], upper[0]]
            self._owned.add(id(lower))
            self._owned.add(id(upper))
        return True

    def discard(self, device_id: str) -> bool:
        """Remove; False if absent."""
        if not self._blocks:
            return False
        i = max(bisect.bisect_right(self._heads, device_id) - 1, 0)
        current = self._blocks[i]
        pos = bisect.bisect_left(current, device_id)
        if pos >= len(current) or current[pos] != device_id:
            return False
        block = self._writable(i)
        del block[pos]
        self._len -= 1
        if block:
            self._heads[i] = block[0]
        else:
            self._owned.discard(id(block))
            del self._blocks[i]
            del self._heads[i]
        return True

    def __contains__(self, device_id: object) -> bool:
        if not isinstance(device_id, str) or not self._blocks:
            return False
        i = max(bisect.bisect_right(self._heads, device_id) - 1, 0)
        block = self._blocks[i]
        pos = bisect.bisect_left(block, device_id)
        return pos < len(block) and block[pos] == device_id

    def window(self, start: str, *, inclusive: bool, limit: int) -> list[str]:
        """Up to ``limit`` ids in order from ``start`` (``>= start`` if
        ``inclusive`` else ``> start``)."""
        out: list[str] = []
        if not self._blocks or limit <= 0:
            return out
        i = max(bisect.bisect_right(self._heads, start) - 1, 0)
        block = self._blocks[i]
        pos = (bisect.bisect_left if inclusive else bisect.bisect_right)(block, start)
        while i < len(self._blocks):
            block = self._blocks[i]
            take = block[pos : pos + limit - len(out)]
            out.extend(take)
            if len(out) >= limit:
                break
            i += 1
            pos = 0
        return out

    def freeze(self) -> list[list[str]]:
        """The ids as blocks that will never change (see module docstring).
        Until :meth:`thaw`, changes copy a block before touching it."""
        self._frozen = True
        self._owned = set()
        return list(self._blocks)

    def thaw(self) -> None:
        """No frozen copy is in use any more: blocks may change in place."""
        self._frozen = False
        self._owned = set()
