"""The paged KV cache's block pool and block hashes (ovfast.runtime.block_pool): pure Python, no device."""
from __future__ import annotations

import random
import time

import pytest

from ovfast.runtime.block_pool import (HASH_BYTES, NULL_BLOCK, ROOT_HASH, BlockPool, MediaSpan, NoFreeBlocks,
                                       block_hashes)


def H(i: int) -> bytes:
    """A made-up block hash."""
    return i.to_bytes(HASH_BYTES, "little")


def snapshot(pool: BlockPool):
    return (list(pool._ref), list(pool._blank), list(pool._lru.items()), dict(pool._by_hash),
            dict(pool._hash_of), pool.used, pool.cached, pool.free_count)


# ---------------------------------------------------------------- BlockPool


def test_fresh_pool():
    pool = BlockPool(8, 16)
    pool.check()
    assert (pool.free_count, pool.used, pool.cached) == (7, 0, 0)
    with pytest.raises(ValueError):
        BlockPool(1, 16)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


def test_allocate_release_and_sharing():
    pool = BlockPool(10, 4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and NULL_BLOCK not in a
    assert all(pool.refcount(b) == 1 for b in a)
    assert (pool.used, pool.free_count) == (3, 6)
    for i, b in enumerate(a[:2]):  # the first two blocks are full: hash them
        assert pool.register(b, H(i))
    # a second sequence with the same two-block prefix shares them and gets its own tail
    shared = pool.match([H(0), H(1), H(2)])
    assert shared == a[:2]
    pool.take(shared)
    b = shared + pool.allocate(1)
    pool.check()
    assert [pool.refcount(x) for x in a] == [2, 2, 1]
    assert pool.used == 4
    pool.release(a)
    pool.check()
    assert [pool.refcount(x) for x in a] == [1, 1, 0]
    assert pool.used == 3 and pool.cached == 0  # b still holds the shared blocks; a's unhashed tail is blank
    pool.release(b)
    pool.check()
    assert pool.used == 0 and pool.cached == 2 and pool.free_count == 9


def test_release_too_often_changes_nothing():
    pool = BlockPool(6, 4)
    a = pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(ValueError):
        pool.release([a[0], a[1], a[1]])
    with pytest.raises(ValueError):
        pool.release([a[0], NULL_BLOCK])
    with pytest.raises(ValueError):
        pool.release([99])
    assert snapshot(pool) == before
    pool.check()


def test_lru_eviction_oldest_first_tail_before_head():
    pool = BlockPool(7, 4)  # 6 usable
    seq1 = pool.allocate(3)
    seq2 = pool.allocate(3)
    for i, b in enumerate(seq1):
        pool.register(b, H(10 + i))
    for i, b in enumerate(seq2):
        pool.register(b, H(20 + i))
    pool.release(seq1)  # freed first: its tail, then middle, then head
    pool.release(seq2)
    pool.check()
    assert pool.cached == 6 and pool.free_count == 6
    expected = seq1[::-1] + seq2[::-1]
    for k, b in enumerate(expected):
        assert pool.allocate(1) == [b]
        pool.check()
        # the evicted block lost its hash; the others still match
        assert pool.hash_of(b) is None
        assert pool.match([H(10), H(11), H(12)]) == seq1[:max(0, 3 - (k + 1))]
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)


def test_blank_blocks_are_used_before_cached_ones():
    pool = BlockPool(6, 4)  # 5 usable
    a = pool.allocate(2)
    pool.register(a[0], H(1))
    pool.register(a[1], H(2))
    pool.release(a)
    assert pool.cached == 2
    got = pool.allocate(3)
    assert not set(got) & set(a)
    assert pool.match([H(1), H(2)]) == a  # nothing evicted yet
    got += pool.allocate(1)
    assert got[-1] == a[1]  # the tail goes first
    assert pool.match([H(1), H(2)]) == [a[0]]
    pool.check()


def test_match_after_release_and_take_revives():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    for i, b in enumerate(a):
        pool.register(b, H(i))
    pool.release(a)
    assert pool.cached == 3 and pool.used == 0
    m = pool.match([H(0), H(1), H(2), H(3)])
    assert m == a
    assert pool.cached == 3  # match takes no reference
    assert pool.match([H(0), H(5), H(2)]) == [a[0]]  # longest prefix only
    assert pool.match([H(7)]) == []
    pool.take(m[:2])
    pool.check()
    assert pool.used == 2 and pool.cached == 1 and pool.free_count == 5
    assert [pool.refcount(b) for b in a] == [1, 1, 0]
    # the revived blocks can no longer be evicted: allocating everything evicts only a[2]
    got = pool.allocate(5)
    assert a[2] in got and a[0] not in got and a[1] not in got
    assert pool.match([H(0), H(1), H(2)]) == a[:2]
    pool.check()


def test_take_rejects_blank_and_bad_ids_without_change():
    pool = BlockPool(6, 4)
    a = pool.allocate(1)
    pool.release(a)  # unhashed: back to blank
    before = snapshot(pool)
    with pytest.raises(ValueError):
        pool.take(a)
    with pytest.raises(ValueError):
        pool.take([NULL_BLOCK])
    with pytest.raises(ValueError):
        pool.take([6])
    assert snapshot(pool) == before


def test_take_same_block_twice():
    pool = BlockPool(4, 4)
    a = pool.allocate(1)
    pool.register(a[0], H(1))
    pool.release(a)
    pool.take(a + a)
    pool.check()
    assert pool.refcount(a[0]) == 2 and pool.cached == 0 and pool.used == 1


def test_no_free_blocks_leaves_pool_unchanged():
    pool = BlockPool(6, 4)
    a = pool.allocate(3)
    pool.register(a[0], H(1))
    pool.release(a[:1])
    before = snapshot(pool)
    assert pool.free_count == 3
    with pytest.raises(NoFreeBlocks) as err:
        pool.allocate(4)
    assert isinstance(err.value, RuntimeError)
    assert snapshot(pool) == before
    pool.check()
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert len(pool.allocate(3)) == 3


def test_register_duplicates_and_rules():
    pool = BlockPool(8, 4)
    a, b = pool.allocate(2)
    assert pool.register(a, H(1))
    assert pool.register(a, H(1))  # again: no-op
    with pytest.raises(ValueError):
        pool.register(a, H(2))  # a block's contents do not change once hashed
    assert not pool.register(b, H(1))  # another block already holds H(1): keep it
    assert pool.hash_of(b) is None and pool.match([H(1)]) == [a]
    with pytest.raises(ValueError):
        pool.register(b, b"short")
    pool.check()
    pool.release([a, b])
    pool.check()
    assert pool.cached == 1 and pool.hash_of(a) == H(1)
    assert b in pool._blank  # b was never hashed: it went back to blank, not to the cache
    with pytest.raises(ValueError):
        pool.register(b, H(3))  # not in use
    # a hash held only by a cached-free block also blocks a duplicate
    c = pool.allocate(1)[0]
    assert not pool.register(c, H(1))
    assert pool.match([H(1)]) == [a]
    pool.check()


def test_null_block_never_handed_out():
    pool = BlockPool(5, 2)
    for rnd in range(20):
        got = pool.allocate(pool.free_count)  # evicts cached blocks as well as blank ones
        assert NULL_BLOCK not in got and sorted(got) == [1, 2, 3, 4]
        for i, b in enumerate(got[:2]):
            pool.register(b, H(10 * rnd + i))
        pool.release(got)
        pool.check()


def test_reset():
    pool = BlockPool(6, 4)
    a = pool.allocate(2)
    pool.register(a[0], H(1))
    b = pool.allocate(1)
    pool.register(b[0], H(2))
    pool.release(b)
    assert pool.cached == 1
    pool.reset()  # a's blocks stay in use, unhashed; b's cached block is blank again
    pool.check()
    assert pool.used == 2 and pool.cached == 0 and pool.free_count == 3
    assert pool.match([H(1)]) == [] and pool.match([H(2)]) == [] and pool.hash_of(a[0]) is None
    pool.release(a)
    pool.check()
    assert pool.cached == 0 and pool.free_count == 5


class Model:
    """The obvious slow model of a block pool: refcounts, hashes, and the time each block was last freed."""

    def __init__(self, n: int):
        self.ref = [0] * n
        self.hash: dict[int, bytes] = {}
        self.freed_at: dict[int, int] = {}
        self.clock = 0

    def free(self) -> int:
        return sum(1 for b in range(1, len(self.ref)) if self.ref[b] == 0)

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.clock += 1
                self.freed_at[b] = self.clock


def test_randomized_against_model():
    """Random admissions (match, take, allocate), registrations, releases and resets, checked op by op.

    Sequences are prefixes of a few fixed "documents" (chains of block hashes) so that prefixes
    are shared, revived from the cache and evicted often; a register now and then uses a hash
    from another document, making duplicates and rejected re-registrations.
    """
    rng = random.Random(1234)
    n = 13
    pool, model = BlockPool(n, 4), Model(n)
    docs = [[H(100 * d + i) for i in range(6)] for d in range(4)]
    seqs: list[tuple[list[int], list[bytes]]] = []  # (blocks, the document they hold)
    for _ in range(4000):
        op = rng.random()
        if op < 0.35:  # admit: match a prefix of a document, take it, allocate the rest
            doc = rng.choice(docs)[:rng.randrange(0, 7)]
            m = pool.match(doc)
            by_hash = {h: b for b, h in model.hash.items()}
            expect = []
            for h in doc:
                if h not in by_hash:
                    break
                expect.append(by_hash[h])
            assert m == expect
            pool.take(m)
            for b in m:
                model.ref[b] += 1
            want = len(doc) - len(m) + rng.randrange(0, 2)  # sometimes a partial tail block too
            if want > model.free():
                before = snapshot(pool)
                with pytest.raises(NoFreeBlocks):
                    pool.allocate(want)
                assert snapshot(pool) == before
                pool.release(m)
                model.release(m)
            else:
                blank = {b for b in range(1, n) if model.ref[b] == 0 and b not in model.hash}
                cached = sorted((b for b in range(1, n) if model.ref[b] == 0 and b in model.hash),
                                key=model.freed_at.__getitem__)
                got = pool.allocate(want)
                n_blank = min(want, len(blank))  # blank blocks first, then cached ones, least recently freed first
                assert len(got) == want and set(got[:n_blank]) <= blank
                assert got[n_blank:] == cached[:want - n_blank]
                for b in got:
                    model.ref[b] = 1
                    model.hash.pop(b, None)
                seqs.append((m + got, doc))
        elif op < 0.6 and any(blocks for blocks, _ in seqs):  # register one full block of a sequence
            blocks, doc = rng.choice([s for s in seqs if s[0]])
            i = rng.randrange(len(blocks))
            b = blocks[i]
            h = doc[i] if i < len(doc) and rng.random() < 0.8 else rng.choice(rng.choice(docs))
            holder = {hh: bb for bb, hh in model.hash.items()}.get(h)
            if b in model.hash:
                if model.hash[b] == h:
                    assert pool.register(b, h)
                else:
                    with pytest.raises(ValueError):
                        pool.register(b, h)
            elif holder is not None:
                assert not pool.register(b, h)
            else:
                assert pool.register(b, h)
                model.hash[b] = h
        elif op < 0.95 and seqs:  # finish a sequence
            blocks, _ = seqs.pop(rng.randrange(len(seqs)))
            pool.release(blocks)
            model.release(blocks)
        elif op >= 0.99:
            pool.reset()
            model.hash.clear()
        pool.check()
        assert pool.used == sum(r > 0 for r in model.ref)
        assert pool.cached == sum(1 for b in range(1, n) if model.ref[b] == 0 and b in model.hash)
        assert pool.free_count == model.free()
        assert [pool.refcount(b) for b in range(n)] == model.ref
        assert {b: pool.hash_of(b) for b in range(n) if pool.hash_of(b)} == model.hash


# ---------------------------------------------------------------- block_hashes

BS = 16
IMG = 9  # the image placeholder id: the same for every image


def prompt(n_text_before: int, n_img: int, n_after: int):
    return list(range(100, 100 + n_text_before)) + [IMG] * n_img + list(range(500, 500 + n_after))


def test_hashes_deterministic_and_shape():
    ids = prompt(20, 40, 30)  # 90 tokens: 5 full blocks and a partial one
    spans = [MediaSpan(20, 60, b"image-a")]
    hs = block_hashes(ids, spans, BS)
    assert len(hs) == 5 and all(len(h) == HASH_BYTES for h in hs)
    assert len(set(hs)) == 5
    assert block_hashes(list(ids), [MediaSpan(20, 60, b"image-a")], BS) == hs
    assert block_hashes(tuple(ids), spans, BS) == hs
    assert block_hashes(list(range(15)), [], BS) == []
    assert block_hashes([], [], BS) == []


def test_hashes_fixed_value():
    """The hash of a known block, written out: the same in every process and on every machine."""
    from hashlib import blake2b
    ids = list(range(BS))
    h = blake2b(ROOT_HASH, digest_size=16)
    h.update(b"".join(i.to_bytes(8, "little", signed=True) for i in ids))
    assert block_hashes(ids, [], BS) == [h.digest()]
    # with a span: relative start and stop, key length, key
    h = blake2b(ROOT_HASH, digest_size=16)
    h.update(b"".join(i.to_bytes(8, "little", signed=True) for i in ids))
    h.update((3).to_bytes(8, "little") + (20).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"k1")
    assert block_hashes(ids, [MediaSpan(3, 20, b"k1")], BS) == [h.digest()]


def test_partial_last_block_not_hashed():
    ids = prompt(10, 30, 0)  # 40 tokens
    assert len(block_hashes(ids, [MediaSpan(10, 40, b"a")], BS)) == 2
    assert len(block_hashes(ids + [1] * 7, [MediaSpan(10, 40, b"a")], BS)) == 2
    assert len(block_hashes(ids + [1] * 8, [MediaSpan(10, 40, b"a")], BS)) == 3


def test_different_media_key_changes_overlapping_and_later_blocks_only():
    # image rows 40..75: blocks 2, 3, 4 overlap it (16..31 = block 1 is text only)
    ids = prompt(40, 35, 60)  # 135 tokens: 8 full blocks
    a = block_hashes(ids, [MediaSpan(40, 75, b"image-a")], BS)
    b = block_hashes(ids, [MediaSpan(40, 75, b"image-b")], BS)
    assert len(a) == len(b) == 8
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:]))
    # token ids alone (no spans) would have collided
    assert block_hashes(ids, [], BS) != a


def test_media_key_affects_only_blocks_it_touches_then_the_chain():
    ids = prompt(16, 16, 32)  # image exactly fills block 1
    a = block_hashes(ids, [MediaSpan(16, 32, b"x")], BS)
    b = block_hashes(ids, [MediaSpan(16, 32, b"y")], BS)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2] and a[3] != b[3]
    # the block with no media equals a media-free hash; a span that ends at a block boundary does not touch the next
    assert a[0] == block_hashes(ids, [], BS)[0]


def test_same_image_other_offset_changes_hashes():
    key = b"the-same-image"
    # same token ids everywhere (the placeholders sit inside a run of placeholder-like ids), same
    # key, the span only moved: every block the span touches differs
    ids = [IMG] * 64
    a = block_hashes(ids, [MediaSpan(8, 40, key)], BS)
    b = block_hashes(ids, [MediaSpan(10, 42, key)], BS)
    assert all(x != y for x, y in zip(a, b))
    # and a real shift in the prompt: one more text token before the image
    a = block_hashes(prompt(20, 40, 40), [MediaSpan(20, 60, key)], BS)
    b = block_hashes(prompt(21, 40, 39), [MediaSpan(21, 61, key)], BS)
    assert a[0] == b[0]  # block 0 is text only, and the same text
    assert all(x != y for x, y in zip(a[1:], b[1:]))


def test_span_order_does_not_matter_and_several_spans():
    ids = [IMG] * 48 + list(range(16))
    s1, s2 = MediaSpan(0, 20, b"one"), MediaSpan(20, 48, b"two")
    a = block_hashes(ids, [s1, s2], BS)
    assert block_hashes(ids, [s2, s1], BS) == a
    # swapping which item is where changes block 1 (it holds the end of one and the start of the other)
    c = block_hashes(ids, [MediaSpan(0, 20, b"two"), MediaSpan(20, 48, b"one")], BS)
    assert all(x != y for x, y in zip(a, c))
    # an empty span touches nothing
    assert block_hashes(ids, [s1, s2, MediaSpan(30, 30, b"zz")], BS) == a


def test_incremental_extension_equals_all_at_once():
    ids = prompt(30, 100, 77)
    spans = [MediaSpan(30, 130, b"img")]
    full = block_hashes(ids, spans, BS)
    assert len(full) == len(ids) // BS
    # grow one token at a time as a decoding sequence would, extending hashes when a block fills
    got: list[bytes] = []
    for n in range(1, len(ids) + 1):
        got += block_hashes(ids[:n], spans, BS, parent=got[-1] if got else None, first_block=len(got))
    assert got == full
    # in pieces with count
    pieces: list[bytes] = []
    while len(pieces) < len(full):
        pieces += block_hashes(ids, spans, BS, count=3, parent=pieces[-1] if pieces else None,
                               first_block=len(pieces))
    assert pieces == full
    assert block_hashes(ids, spans, BS, count=2) == full[:2]
    assert block_hashes(ids, spans, BS, count=0) == []
    assert block_hashes(ids, spans, BS, count=1000) == full


def test_hash_argument_checks():
    with pytest.raises(ValueError):
        block_hashes([1] * 32, [], BS, first_block=1)  # no parent
    with pytest.raises(ValueError):
        block_hashes([1] * 32, [], BS, parent=b"x", first_block=1)
    with pytest.raises(ValueError):
        block_hashes([1] * 32, [], 0)
    with pytest.raises(ValueError):
        block_hashes([1] * 32, [], BS, count=-1)
    with pytest.raises(ValueError):
        MediaSpan(5, 4, b"k")
    with pytest.raises(ValueError):
        MediaSpan(-1, 4, b"k")
    with pytest.raises(TypeError):
        MediaSpan(0, 4, "k")


def test_numpy_ids_hash_like_a_list():
    np = pytest.importorskip("numpy")
    ids = prompt(10, 50, 20)
    spans = [MediaSpan(10, 60, b"k")]
    assert block_hashes(np.asarray(ids, dtype=np.int64), spans, BS) == block_hashes(ids, spans, BS)


def test_16k_prompt_hashes_quickly():
    rng = random.Random(7)
    ids = [rng.randrange(150_000) for _ in range(16384)]
    spans = [MediaSpan(100 + 200 * i, 100 + 200 * i + 196, bytes([i]) * 16) for i in range(32)]  # 32 video frames
    t = time.perf_counter()
    hs = block_hashes(ids, spans, BS)
    elapsed = time.perf_counter() - t
    assert len(hs) == 1024 and len(set(hs)) == 1024
    print(f"16k tokens, 32 spans: {elapsed * 1e3:.1f} ms")  # informational; not asserted (shared CI machines)


def test_hashes_drive_the_pool():
    """Two prompts with the same text and same-size images: they share only the blocks before the image."""
    pool = BlockPool(32, BS)
    ids = prompt(40, 64, 20)
    ha = block_hashes(ids, [MediaSpan(40, 104, b"cat")], BS)
    hb = block_hashes(ids, [MediaSpan(40, 104, b"dog")], BS)
    a = pool.allocate(len(ids) // BS + 1)
    for blk, h in zip(a, ha):
        pool.register(blk, h)
    m = pool.match(hb)
    assert m == a[:2]  # blocks 0 and 1 hold text only (0..31); block 2 holds the image from row 40
    pool.take(m)
    b = m + pool.allocate(len(hb) - len(m) + 1)
    for blk, h in zip(b[len(m):], hb[len(m):]):
        assert pool.register(blk, h)
    pool.release(a)
    pool.release(b)
    pool.check()
    assert pool.match(ha) == a[:len(ha)]
    assert pool.match(hb) == b[:len(hb)]
