"""The static KV cache: allocated once per engine, written in place, never resized.

One K and one V tensor of shape (layers, slots, max_len, kv_heads, head_dim): per layer and
slot this is the [S, Hkv, d] layout flash-attn's kvcache kernels read, and a captured CUDA graph
can hold on to it because its address never changes.
"""
from __future__ import annotations

import torch

from .config import TextConfig


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.slots = slots
        self.max_len = max_len
        shape = (cfg.num_layers, slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        # torch.empty: nothing is read before it is written (prefill fills positions 0..L-1 first).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
