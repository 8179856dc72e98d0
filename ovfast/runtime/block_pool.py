"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, their references, and prefix caching.

A sequence's KV rows live in ``block_size``-row blocks named by a block table. Two sequences
whose prompts start the same way can share the blocks of that common prefix: each FULL block
gets a hash that chains the hash of the block before it, so equal hashes mean equal prefixes up
to and including that block (and so equal keys and values, since RoPE positions follow from the
block's index). Media placeholders make token ids alone insufficient: two images of the same
size have identical placeholder ids, so the hash also covers the key of every media item that
overlaps the block and where that item starts relative to the block.

A block whose last reference goes away keeps its contents and hash ("cached-free"): a later
prompt with the same prefix can revive it with ``take``. Cached-free blocks are evicted least
recently freed first, and only when no never-hashed ("blank") block is left. ``release`` drops a
sequence's blocks tail first, so a prefix's head outlives its tail: a shorter shared prefix
stays matchable longer.

Order for admitting a sequence: ``match`` its hashes, ``take`` the matched blocks, then
``allocate`` the rest (taking first keeps ``allocate`` from evicting the very blocks just
matched); if ``allocate`` raises ``NoFreeBlocks``, ``release`` what was taken.

Pure Python and single-threaded: the scheduler's thread is the only caller. Block 0 is the null
block: never handed out, so padding entries of a block table can point at it.
"""
from __future__ import annotations

import struct
import sys
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

HASH_BYTES = 16
NULL_BLOCK = 0
# The parent of a sequence's first block; any fixed value works, a named one reads better in a dump.
ROOT_HASH = blake2b(b"ovfast.kv.block-hash.v1", digest_size=HASH_BYTES).digest()

_SPAN_HEADER = struct.Struct("<qqQ")  # start and stop relative to the block's first position, key length


@dataclass(frozen=True)
class MediaSpan:
    """Prompt positions [start, stop) holding one media item's feature rows; ``key`` names its content."""

    start: int
    stop: int
    key: bytes

    def __post_init__(self):
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"MediaSpan needs 0 <= start <= stop, got [{self.start}, {self.stop})")
        if not isinstance(self.key, bytes):
            raise TypeError(f"MediaSpan.key must be bytes, got {type(self.key).__name__}")


def _int64_le(ids: Sequence[int]) -> bytes:
    packed = ids if isinstance(ids, array) and ids.typecode == "q" else array("q", ids)
    if sys.byteorder != "little":
        packed = array("q", packed)
        packed.byteswap()
    return packed.tobytes()


def block_hashes(ids: Sequence[int], spans: Sequence[MediaSpan], block_size: int, count: int | None = None,
                 parent: bytes | None = None, first_block: int = 0) -> list[bytes]:
    """The chained hash of each full block of ``ids`` from block ``first_block`` on, at most ``count``.

    ``ids`` is the whole sequence (positions from 0). To extend the hashes of a growing sequence,
    pass the hash of block ``first_block - 1`` as ``parent``; the result equals that part of
    hashing everything at once. A partial last block gets no hash (its contents are not final).

    Block i's hash is blake2b-128 over: the parent hash (``ROOT_HASH`` for block 0), the block's
    ids as little-endian int64, then for each span overlapping the block (in (start, stop, key)
    order) its start and stop relative to the block's first position and its key. The relative
    start tells the same image placed at another offset apart; the chain carries everything before.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if first_block < 0:
        raise ValueError(f"first_block must be >= 0, got {first_block}")
    if first_block > 0 and parent is None:
        raise ValueError("extending from first_block > 0 needs the parent hash of block first_block - 1")
    if parent is not None and len(parent) != HASH_BYTES:
        raise ValueError(f"parent must be a {HASH_BYTES}-byte block hash, got {len(parent)} bytes")
    stop_block = len(ids) // block_size
    if count is not None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        stop_block = min(stop_block, first_block + count)
    if stop_block <= first_block:
        return []

    # The media overlapping each block, found once per span (a prompt has few spans, many blocks).
    per_block: dict[int, list[MediaSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.start, s.stop, s.key)):
        if span.start == span.stop:
            continue
        for b in range(max(span.start // block_size, first_block), min((span.stop - 1) // block_size + 1, stop_block)):
            per_block.setdefault(b, []).append(span)

    row = block_size * 8
    data = _int64_le(ids[first_block * block_size: stop_block * block_size])
    out: list[bytes] = []
    prev = ROOT_HASH if parent is None else bytes(parent)
    for j, b in enumerate(range(first_block, stop_block)):
        h = blake2b(prev, digest_size=HASH_BYTES)
        h.update(data[j * row:(j + 1) * row])
        base = b * block_size
        for span in per_block.get(b, ()):
            h.update(_SPAN_HEADER.pack(span.start - base, span.stop - base, len(span.key)))
            h.update(span.key)
        prev = h.digest()
        out.append(prev)
    return out


class NoFreeBlocks(RuntimeError):
    """Fewer free blocks than asked for; the pool is left as it was."""


class BlockPool:
    """Blocks 1..num_blocks-1 with reference counts; full blocks can carry a prefix hash (see module doc).

    Every usable block is in exactly one state: in use (ref > 0), blank (ref 0, no hash, in the
    free deque), or cached-free (ref 0, has a hash, in the LRU ``OrderedDict``). ``check`` verifies this.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._blank: deque[int] = deque(range(1, num_blocks))
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # cached-free, least recently freed first
        self._by_hash: dict[bytes, int] = {}  # every hashed block, in use or cached-free
        self._hash_of: dict[int, bytes] = {}
        self._used = 0

    # ---- counters
    @property
    def free_count(self) -> int:
        """Blocks ``allocate`` can hand out now: blank plus evictable cached-free."""
        return len(self._blank) + len(self._lru)

    @property
    def used(self) -> int:
        """Blocks with at least one reference."""
        return self._used

    @property
    def cached(self) -> int:
        """Cached-free blocks: no reference, contents kept for a later prefix match."""
        return len(self._lru)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def hash_of(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    # ---- operations
    def match(self, hashes: Iterable[bytes]) -> list[int]:
        """The blocks holding the longest prefix of ``hashes`` (in use or cached-free). Takes no reference."""
        out = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def take(self, blocks: Iterable[int]) -> None:
        """One more reference on each block (a block may repeat); a cached-free block leaves the LRU."""
        blocks = list(blocks)
        for b in blocks:  # validate everything first: a bad id changes nothing
            self._check_id(b)
            if self._ref[b] == 0 and b not in self._hash_of:
                raise ValueError(f"block {b} is blank: only in-use or cached (matched) blocks can be taken")
        for b in blocks:
            if self._ref[b] == 0:
                del self._lru[self._hash_of[b]]
                self._used += 1
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` blank blocks with one reference each: never-hashed first, then the least recently freed cached."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.free_count:
            raise NoFreeBlocks(f"asked for {n} blocks, {self.free_count} free of {self.num_blocks - 1}")
        out = []
        for _ in range(n):
            if self._blank:
                b = self._blank.popleft()
            else:
                h, b = self._lru.popitem(last=False)
                del self._by_hash[h]
                del self._hash_of[b]
            self._ref[b] = 1
            out.append(b)
        self._used += n
        return out

    def release(self, blocks: Iterable[int]) -> None:
        """One reference less on each block, last block first (so a sequence's tail is evicted before its head).

        A block reaching zero references joins the cached-free LRU end if it holds a hash, else the blank list.
        """
        blocks = list(blocks)
        for b in blocks:
            self._check_id(b)
        for b, n in Counter(blocks).items():
            if self._ref[b] < n:
                raise ValueError(f"block {b} released {n} times but holds {self._ref[b]} references")
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._used -= 1
                h = self._hash_of.get(b)
                if h is None:
                    self._blank.append(b)
                else:
                    self._lru[h] = b

    def register(self, block: int, h: bytes) -> bool:
        """Record that in-use full ``block`` holds hash ``h``; True if it now does.

        If another block already holds ``h`` the existing mapping stays and this block remains
        unhashed (it goes back to blank when released): one block per prefix, no duplicates.
        """
        self._check_id(block)
        if self._ref[block] == 0:
            raise ValueError(f"block {block} is not in use; only a block being written can be registered")
        if len(h) != HASH_BYTES:
            raise ValueError(f"a block hash is {HASH_BYTES} bytes, got {len(h)}")
        old = self._hash_of.get(block)
        if old is not None:
            if old == h:
                return True
            raise ValueError(f"block {block} already holds another hash")
        if h in self._by_hash:
            return False
        self._by_hash[h] = block
        self._hash_of[block] = h
        return True

    def reset(self) -> None:
        """Forget every cached hash (e.g. after the weights change, or to measure cold requests).
        Blocks in use stay with their owners, unhashed: they go back to blank when released."""
        self._blank.extend(self._lru.values())
        self._lru.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    # ---- debugging
    def check(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (tests call this after every op)."""
        def fail(msg: str):
            raise AssertionError(f"BlockPool invariant: {msg}")

        if self._ref[NULL_BLOCK] != 0 or NULL_BLOCK in self._hash_of:
            fail("the null block has a reference or a hash")
        blank = set(self._blank)
        if len(blank) != len(self._blank):
            fail("a block is on the blank list twice")
        lru = set(self._lru.values())
        if len(lru) != len(self._lru):
            fail("a block is in the cached LRU twice")
        used = 0
        for b in range(1, self.num_blocks):
            r = self._ref[b]
            if r < 0:
                fail(f"block {b} has refcount {r}")
            states = (r > 0) + (b in blank) + (b in lru)
            if states != 1:
                fail(f"block {b} is in {states} states (ref {r}, blank {b in blank}, cached {b in lru})")
            used += r > 0
            h = self._hash_of.get(b)
            if b in blank and h is not None:
                fail(f"blank block {b} has a hash")
            if b in lru and (h is None or self._lru.get(h) != b):
                fail(f"cached block {b} is not under its own hash in the LRU")
        if NULL_BLOCK in blank or NULL_BLOCK in lru:
            fail("the null block is free")
        if used != self._used:
            fail(f"used counter {self._used} but {used} blocks in use")
        if len(self._by_hash) != len(self._hash_of) or any(self._hash_of.get(b) != h for h, b in self._by_hash.items()):
            fail("hash -> block and block -> hash maps disagree")

    def _check_id(self, b: int) -> None:
        if not 0 < b < self.num_blocks:
            raise ValueError(f"block {b} is not a usable block (1..{self.num_blocks - 1})")
