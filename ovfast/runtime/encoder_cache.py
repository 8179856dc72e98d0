"""A cache of projected vision features, so a repeated image or video is not run through the tower again.

Entries are keyed by the media item's content key (bytes, computed elsewhere) and sized by their
feature rows (one row per placeholder token); the total stays within ``budget_tokens``, evicting
the least recently used entry first. An entry a running request still needs (its prefill has not
consumed the rows yet) is pinned and never evicted; pins count, so two requests may pin one key.

A budget of 0 turns the cache off: every ``get`` misses and ``put`` stores nothing.

Not thread-safe: the scheduler's thread is its only user. It holds references to the tensors and
never touches their data, so it imports no torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class EncoderCache:
    def __init__(self, budget_tokens: int):
        if budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self._entries: OrderedDict[bytes, Tensor] = OrderedDict()  # least recently used first
        self._pins: dict[bytes, int] = {}
        self._tokens = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        """Whether ``key`` is held; unlike ``get`` it neither counts nor refreshes."""
        return key in self._entries

    @property
    def tokens(self) -> int:
        """Feature rows held, pinned ones included."""
        return self._tokens

    def get(self, key: bytes) -> Tensor | None:
        """The features under ``key`` (refreshing its recency), or None; counted as a hit or a miss."""
        feats = self._entries.get(key)
        if feats is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return feats

    def put(self, key: bytes, feats: Tensor) -> bool:
        """Store ``feats`` (rows, D) under ``key``, evicting least recently used unpinned entries to fit.

        Returns whether the key is held afterwards. A key already held only has its recency
        refreshed (the key names the content, so the features are the same). Nothing is evicted
        when the item cannot fit anyway: larger than the budget, or too much of it pinned.
        """
        if self.budget_tokens == 0:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        rows = int(feats.shape[0])
        if rows > self.budget_tokens:
            return False
        need = self._tokens + rows - self.budget_tokens
        if need > 0:
            victims, freed = [], 0
            for k, v in self._entries.items():
                if k in self._pins:
                    continue
                victims.append(k)
                freed += int(v.shape[0])
                if freed >= need:
                    break
            if freed < need:
                return False
            for k in victims:
                self._tokens -= int(self._entries.pop(k).shape[0])
        self._entries[key] = feats
        self._tokens += rows
        return True

    def pin(self, key: bytes) -> None:
        """Keep ``key`` (which must be held) from eviction until a matching ``unpin``."""
        if key not in self._entries:
            raise KeyError(f"cannot pin a key the encoder cache does not hold: {key!r}")
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: bytes) -> None:
        n = self._pins.get(key, 0)
        if n == 0:
            raise KeyError(f"unpin of a key that is not pinned: {key!r}")
        if n == 1:
            del self._pins[key]
        else:
            self._pins[key] = n - 1

    def pinned(self, key: bytes) -> int:
        """How many pins ``key`` holds (0 if none)."""
        return self._pins.get(key, 0)

    def clear(self) -> None:
        """Drop every entry (e.g. after the weights change); only while nothing is pinned. Counters stay."""
        if self._pins:
            raise ValueError(f"cannot clear the encoder cache while {len(self._pins)} entries are pinned")
        self._entries.clear()
        self._tokens = 0

    def stats(self) -> dict[str, int]:
        return dict(hits=self.hits, misses=self.misses, tokens=self._tokens, entries=len(self._entries))
