"""Which part of the Qwen2 decoder each tensor-parallel rank holds (Megatron-style).

Query heads are split evenly; key/value heads are split when there are at least as many as
ranks and replicated otherwise (each rank keeps the one its query heads read), as vLLM does; the
MLP's intermediate width is split (as evenly as it goes); the vocabulary (embedding rows and lm_head rows) is padded to
a multiple of the rank count and split, the padding rows zero. One process is the plan of size 1,
so the single-GPU model runs the same code with full ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.config import TextConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    q_heads: range  # global query-head indices on this rank
    kv_heads: range  # global key/value-head indices on this rank
    intermediate: range  # columns of gate/up (rows of down) on this rank
    vocab: range  # rows of the padded vocabulary on this rank (may run past vocab_size)
    vocab_size: int  # the real vocabulary

    @property
    def vocab_rows(self) -> range:
        """The rows of ``vocab`` that exist in the checkpoint (the rest are padding)."""
        return range(self.vocab.start, min(self.vocab.stop, self.vocab_size))


def check_parallel_size(cfg: TextConfig, size: int) -> None:
    """ConfigError unless the decoder can be cut ``size`` ways."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if cfg.num_heads % size:
        raise ConfigError(f"tensor_parallel_size {size} does not divide the {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ConfigError(f"tensor_parallel_size {size} neither divides nor is a multiple of the {kv} key/value heads")
    if cfg.intermediate_size < size:
        raise ConfigError(f"tensor_parallel_size {size} exceeds the MLP width {cfg.intermediate_size}")


def plan_shards(cfg: TextConfig, rank: int = 0, size: int = 1) -> ShardPlan:
    check_parallel_size(cfg, size)
    if not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is outside a tensor-parallel group of {size}")
    heads = cfg.num_heads // size
    kv = cfg.num_kv_heads
    if kv >= size:
        kv_heads = range(rank * (kv // size), (rank + 1) * (kv // size))
    else:  # replicated: size // kv consecutive ranks share one key/value head
        first = rank * kv // size
        kv_heads = range(first, first + 1)
    inter = cfg.intermediate_size
    per_rank = -(-cfg.vocab_size // size)
    return ShardPlan(
        rank=rank, size=size,
        q_heads=range(rank * heads, (rank + 1) * heads),
        kv_heads=kv_heads,
        intermediate=range(rank * inter // size, (rank + 1) * inter // size),  # any split sums right: uneven is fine
        vocab=range(rank * per_rank, (rank + 1) * per_rank),
        vocab_size=cfg.vocab_size,
    )
