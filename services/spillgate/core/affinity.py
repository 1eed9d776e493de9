"""Soft-affinity state: an approximate prefix-cache index and a bounded session table.

The prefix index remembers, per lane, the block hashes of prompts this admission SERVEd there
(an LRU sized to the lane's KV capacity in blocks), so it predicts which replica still holds a
prompt's prefix without asking it. Hashes are namespaced by (model, version, cache salt): a
64-bit mask derived from the namespace is XORed into every block hash, so equal prompts under
different models or salts never match, and keys stay plain ints (cheap on the hot path).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice


def namespace_mask(model: str, version: str, cache_salt: str) -> int:
    """Stable 64-bit mask of a prefix namespace (XORed into block hashes)."""
    data = f"{model}\x1f{version}\x1f{cache_salt}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixIndex:
    """Approximate per-lane LRU of namespaced block hashes plus a reverse index.

    ``holders[key]`` lists the lanes that hold ``key``. Touching a chain inserts it tail
    first so the head is most recent: LRU eviction then drops tails before the prefix they
    extend, which keeps every lane's chains prefix-closed, so the deepest matching block can
    be found by binary search.

    Recording a SERVEd prompt is a third of a decision's cost and is bound by memory (tens
    of thousands of keys), so the structures are the smallest that do the job: a lane's LRU
    is a plain dict in recency order (oldest first; a use deletes and re-inserts the key),
    and the lanes holding a key are a tuple, not a set: most keys have one or two holders,
    a small tuple is a fifth of a set's size, and the garbage collector stops tracking a
    tuple of ints.
    """

    def __init__(self, stride: int = 1) -> None:
        # Only every ``stride``-th block is indexed (its hash covers all blocks before it,
        # so a match there proves the whole prefix): 1/stride of the cost and memory, match
        # depth rounded down to a multiple of ``stride``.
        self._stride = max(1, stride)
        self._holders: dict[int, tuple[int, ...]] = {}
        self._lru: dict[int, dict[int, None]] = {}
        self._capacity: dict[int, int] = {}

    def add_lane(self, lane: int, capacity_blocks: int) -> None:
        """Register (or resize) a lane's LRU."""
        self._lru.setdefault(lane, {})
        self._capacity[lane] = max(1, capacity_blocks)
        self._evict(lane)

    def remove_lane(self, lane: int) -> None:
        """Forget a lane and everything it held."""
        for key in self._lru.pop(lane, {}):
            self._drop(key, lane)
        self._capacity.pop(lane, None)

    def match(
        self, mask: int, hashes: tuple[int, ...], min_blocks: int
    ) -> tuple[int, tuple[int, ...]]:
        """(depth, lanes) of the deepest block of ``hashes`` any lane holds, if >= min_blocks.

        Returns (0, ()) when no lane holds at least ``min_blocks`` leading blocks.
        O(log n) dict lookups.
        """
        holders = self._holders
        stride = self._stride
        if len(hashes) < min_blocks:
            return 0, _EMPTY
        if stride > 1:
            hashes = hashes[stride - 1 :: stride]
        n = len(hashes)
        if n == 0 or (hashes[0] ^ mask) not in holders:
            return 0, _EMPTY
        lo, hi = 1, n  # invariant: block lo-1 is held; find the largest such lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (hashes[mid - 1] ^ mask) in holders:
                lo = mid
            else:
                hi = mid - 1
        if lo * stride < max(min_blocks, 1):
            return 0, _EMPTY
        return lo * stride, holders[hashes[lo - 1] ^ mask]

    def touch(self, lane: int, mask: int, hashes: tuple[int, ...]) -> None:
        """Record that ``lane`` now caches the chain ``hashes`` (most recent use)."""
        lru = self._lru.get(lane)
        if lru is None:
            return
        holders = self._holders
        stride = self._stride
        only = (lane,)  # shared by every key only this lane holds
        pop = lru.pop
        for h in reversed(hashes[stride - 1 :: stride] if stride > 1 else hashes):
            key = h ^ mask
            # One lookup takes a held key out (values are None); re-inserted last below.
            if pop(key, _NEW) is _NEW:
                lanes = holders.setdefault(key, only)
                if lanes is not only:
                    holders[key] = (*lanes, lane)
            lru[key] = None  # the most recent
        if len(lru) > self._capacity[lane]:
            self._evict(lane)

    def size(self, lane: int) -> int:
        """Indexed blocks remembered for ``lane``."""
        return len(self._lru.get(lane, ()))

    def _evict(self, lane: int) -> None:
        lru, holders = self._lru[lane], self._holders
        # The oldest keys come first; inlines _drop: this runs for most SERVEs of a full lane.
        for key in list(islice(lru, max(0, len(lru) - self._capacity[lane]))):
            del lru[key]
            lanes = holders.pop(key)
            if len(lanes) > 1:
                holders[key] = _without(lanes, lane)

    def _drop(self, key: int, lane: int) -> None:
        lanes = self._holders.pop(key, ())
        if len(lanes) > 1:
            self._holders[key] = _without(lanes, lane)


def _without(lanes: tuple[int, ...], lane: int) -> tuple[int, ...]:
    # A lane holds a key at most once (it is added only when the key is new to its LRU), so
    # slicing around it equals filtering it out, without a generator per evicted key.
    i = lanes.index(lane)
    return lanes[:i] + lanes[i + 1 :]


_EMPTY: tuple[int, ...] = ()  # returned for "no match"
_NEW = object()  # ``touch``'s marker for a key the lane did not hold


@dataclass(slots=True)  # a value, not frozen: built on every SERVE with a session
class SessionEntry:
    """What a session is pinned to: the version it resolved and the replica that served it."""

    requested: str  # the alias or model the session asked for
    model: str
    version: str
    replica: str  # "" when the session went to a neighbour region


class SessionTable:
    """Bounded LRU map session id -> :class:`SessionEntry`."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()

    def get(self, session: str) -> SessionEntry | None:
        """Look up without touching recency (safe for dry runs)."""
        return self._entries.get(session)

    def put(self, session: str, entry: SessionEntry) -> None:
        """Insert or refresh; evicts the least recently used beyond capacity."""
        self._entries[session] = entry
        self._entries.move_to_end(session)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
