"""The paged KV cache: per layer a pool of fixed-size pages, allocated once, read through block tables.

One K and one V tensor of shape (layers, num_blocks, block_size, kv_heads, head_dim). A sequence
owns a list of pages (its block table); its position p lives in page ``table[p // block_size]``
at offset ``p % block_size``. Page 0 is the null page: never handed out, it is where padding
entries of block tables point and where idle decode rows write, so a captured CUDA graph can
always index a valid address. Which pages belong to whom is the scheduler's ``BlockPool``.
"""
from __future__ import annotations

import torch

from ..checkpoint.config import TextConfig


def blocks_for(tokens: int, block_size: int) -> int:
    """Pages that hold ``tokens`` positions."""
    return -(-tokens // block_size)


def bytes_per_token(cfg: TextConfig, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """K and V bytes of one position over all layers (this rank's kv heads)."""
    return 2 * cfg.num_layers * (kv_heads or cfg.num_kv_heads) * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_heads: int | None = None):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs the null page and at least one more, got {num_blocks} pages")
        self.num_blocks, self.block_size = num_blocks, block_size
        # kv_heads: this rank's share under tensor parallelism (the cache is sharded by key/value head).
        shape = (cfg.num_layers, num_blocks, block_size, kv_heads or cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not torch.empty: attention reads whole pages and masks the positions past a
        # sequence's length, and masked garbage that happens to be NaN still poisons the output
        # (0 * NaN); reused allocator memory can hold such bytes.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def tokens(self) -> int:
        """Positions the usable pages hold (the null page aside)."""
        return (self.num_blocks - 1) * self.block_size

    def sized(self, num_blocks: int) -> "KVCache":
        """A new cache like this one (layers, heads, dtype, page size, device) of ``num_blocks``
        pages: a scoring job's scratch, so it never takes pages from running sequences."""
        out = object.__new__(KVCache)
        out.num_blocks, out.block_size = num_blocks, self.block_size
        out.k = torch.zeros((self.k.shape[0], num_blocks, *self.k.shape[2:]), dtype=self.k.dtype, device=self.k.device)
        out.v = torch.zeros_like(out.k)
        return out

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
