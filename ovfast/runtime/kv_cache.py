"""The static KV cache: allocated once per engine, written in place, never resized.

One K and one V tensor of shape (layers, slots, max_len, kv_heads, head_dim): per layer and
slot this is the [S, Hkv, d] layout flash-attn's kvcache kernels read, and a captured CUDA graph
can hold on to it because its address never changes.
"""
from __future__ import annotations

import torch

from ..checkpoint.config import TextConfig


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 kv_heads: int | None = None):
        self.slots = slots
        self.max_len = max_len
        # kv_heads: this rank's share under tensor parallelism (the cache is sharded by key/value head).
        shape = (cfg.num_layers, slots, max_len, kv_heads or cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not torch.empty: a batched decode step reads every row up to the longest row's
        # length and masks the rest, and masked garbage that happens to be NaN still poisons the
        # attention output (0 * NaN); reused allocator memory can hold such bytes.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def sized(self, slots: int, max_len: int) -> "KVCache":
        """A new cache like this one (layers, heads, dtype, device) of another size: a job's scratch."""
        out = object.__new__(KVCache)
        out.slots, out.max_len = slots, max_len
        layers, _, _, heads, head_dim = self.k.shape
        out.k = torch.zeros((layers, slots, max_len, heads, head_dim), dtype=self.k.dtype, device=self.k.device)
        out.v = torch.zeros_like(out.k)
        return out

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
