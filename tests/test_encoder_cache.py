"""The vision-feature cache (ovfast.runtime.encoder_cache): LRU within a row budget, pins, counters."""
from __future__ import annotations

import random

import pytest
import torch

from ovfast.runtime.encoder_cache import EncoderCache

D = 8


def feats(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def test_put_get_and_counters():
    c = EncoderCache(100)
    assert c.get(b"a") is None
    x = feats(10, 1)
    assert c.put(b"a", x)
    got = c.get(b"a")
    assert got is x and torch.equal(got, feats(10, 1))
    assert c.get(b"b") is None
    assert (len(c), c.tokens) == (1, 10)
    assert c.stats() == dict(hits=1, misses=2, tokens=10, entries=1)
    assert b"a" in c and b"b" not in c
    assert c.stats()["hits"] == 1  # `in` counts nothing


def test_lru_eviction_and_get_refreshes():
    c = EncoderCache(30)
    for k in (b"a", b"b", b"c"):
        assert c.put(k, feats(10))
    assert c.tokens == 30
    assert c.get(b"a") is not None  # a is now the most recent: b is the oldest
    assert c.put(b"d", feats(10))
    assert b"b" not in c and all(k in c for k in (b"a", b"c", b"d"))
    # a bigger item evicts as many of the oldest as it needs, and no more
    assert c.put(b"e", feats(20))
    assert b"c" not in c and b"a" not in c and b"d" in c and b"e" in c
    assert c.tokens == 30 and len(c) == 2


def test_put_existing_key_refreshes_without_duplicating():
    c = EncoderCache(30)
    x = feats(10, 1)
    c.put(b"a", x)
    c.put(b"b", feats(10))
    c.put(b"c", feats(10))
    assert c.put(b"a", feats(10, 2))  # refresh: a is now most recent
    assert c.tokens == 30 and len(c) == 3
    assert c.get(b"a") is x  # the key names the content: the first tensor stays
    c.put(b"d", feats(10))
    assert b"b" not in c and b"a" in c


def test_item_larger_than_budget_is_not_stored_and_evicts_nothing():
    c = EncoderCache(25)
    c.put(b"a", feats(10))
    c.put(b"b", feats(10))
    assert not c.put(b"huge", feats(26))
    assert b"huge" not in c and len(c) == 2 and c.tokens == 20
    assert c.put(b"exact", feats(25))  # exactly the budget fits (evicting everything else)
    assert len(c) == 1 and c.tokens == 25


def test_pins_block_eviction():
    c = EncoderCache(30)
    c.put(b"a", feats(10))
    c.put(b"b", feats(10))
    c.put(b"c", feats(10))
    c.pin(b"a")
    c.pin(b"a")  # two requests need it
    assert c.pinned(b"a") == 2
    assert c.put(b"d", feats(10))  # a is the oldest but pinned: b goes
    assert b"a" in c and b"b" not in c
    c.pin(b"c")
    c.pin(b"d")
    # nothing unpinned left to evict: not stored, and nothing evicted
    assert not c.put(b"e", feats(5))
    assert len(c) == 3 and c.tokens == 30
    c.unpin(b"a")
    assert not c.put(b"e", feats(5))  # a still has one pin
    c.unpin(b"a")
    assert c.pinned(b"a") == 0
    assert c.put(b"e", feats(5))
    assert b"a" not in c and c.tokens == 25
    with pytest.raises(KeyError):
        c.unpin(b"a")
    with pytest.raises(KeyError):
        c.pin(b"missing")


def test_not_enough_evictable_changes_nothing():
    c = EncoderCache(30)
    c.put(b"a", feats(10))
    c.put(b"p", feats(15))
    c.pin(b"p")
    # 20 rows need 15 freed; only a (10) is evictable: nothing happens
    assert not c.put(b"x", feats(20))
    assert b"a" in c and b"p" in c and c.tokens == 25


def test_budget_zero_disables():
    c = EncoderCache(0)
    assert not c.put(b"a", feats(3))
    assert not c.put(b"empty", feats(0))
    assert c.get(b"a") is None and c.get(b"empty") is None
    assert c.stats() == dict(hits=0, misses=2, tokens=0, entries=0)
    with pytest.raises(ValueError):
        EncoderCache(-1)


def test_clear():
    c = EncoderCache(50)
    c.put(b"a", feats(10))
    c.put(b"b", feats(10))
    c.get(b"a")
    c.pin(b"b")
    with pytest.raises(ValueError):
        c.clear()  # a running request still needs b
    c.unpin(b"b")
    c.clear()
    assert len(c) == 0 and c.tokens == 0
    assert c.get(b"a") is None
    assert c.stats() == dict(hits=1, misses=1, tokens=0, entries=0)  # counters survive a clear


def test_randomized_against_model():
    """Random get/put/pin/unpin against a list-based model; the budget always holds."""
    rng = random.Random(99)
    budget = 40
    c = EncoderCache(budget)
    order: list[bytes] = []  # least recently used first
    rows: dict[bytes, int] = {}
    pins: dict[bytes, int] = {}
    keys = [bytes([i]) for i in range(12)]
    hits = misses = 0
    for _ in range(3000):
        k = rng.choice(keys)
        op = rng.random()
        if op < 0.35:
            got = c.get(k)
            if k in rows:
                hits += 1
                assert got is not None and got.shape == (rows[k], D)
                order.remove(k)
                order.append(k)
            else:
                misses += 1
                assert got is None
        elif op < 0.7:
            r = rng.randrange(0, 25)
            if k in rows:
                assert c.put(k, feats(r))
                order.remove(k)
                order.append(k)
            else:
                need = sum(rows.values()) + r - budget
                victims, freed = [], 0
                for v in order:
                    if need <= freed:
                        break
                    if v not in pins:
                        victims.append(v)
                        freed += rows[v]
                ok = r <= budget and freed >= need
                assert c.put(k, feats(r)) == ok
                if ok:
                    for v in victims:
                        order.remove(v)
                        del rows[v]
                    order.append(k)
                    rows[k] = r
        elif op < 0.85:
            if k in rows:
                c.pin(k)
                pins[k] = pins.get(k, 0) + 1
            else:
                with pytest.raises(KeyError):
                    c.pin(k)
        else:
            if k in pins:
                c.unpin(k)
                pins[k] -= 1
                if not pins[k]:
                    del pins[k]
            else:
                with pytest.raises(KeyError):
                    c.unpin(k)
        assert list(c._entries) == order
        assert c.tokens == sum(rows.values()) <= budget
        assert all(k in rows for k in pins)
        assert {k: c.pinned(k) for k in keys if c.pinned(k)} == pins
        assert c.stats() == dict(hits=hits, misses=misses, tokens=sum(rows.values()), entries=len(rows))
