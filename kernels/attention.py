"""The three attention entry points and the choice of backend behind them.

``attention_prefill``, ``attention_chunk`` and ``attention_decode`` take the arguments of the
same-named ops in ``ovfast.ops`` and run one of three backends, all on the flash-attn tensor
layouts (packed (T, H, d) activations; a paged KV cache of (num_blocks, block_size, Hkv, d) per
layer read through int32 block tables), so they share one KV cache:

* ``flash_attn``: the flash-attn package's ``flash_attn_varlen_func`` (prefill) and
  ``flash_attn_with_kvcache(..., cache_seqlens=, block_table=)`` (decode and chunks); chosen when
  it is importable and the tensors are CUDA fp16/bf16 on an sm80+ GPU with a head dim that is a
  multiple of 8 up to 256, and, for the paged ops, the page size is a multiple of 256 (flash-attn
  2's paged path rejects anything else);
* ``triton``: ovfast's kernels (``prefill_attention``, ``chunk_attention``, ``decode_attention``);
  for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1`` (CI);
* ``torch``: the reference bodies of ``ovfast.ops`` (SDPA), everywhere else.

``OVFAST_ATTENTION`` (read at import; ``set_attention_mode`` / ``attention_mode`` change it)
forces the choice: ``auto`` (default, the order above), ``flash_attn``, ``triton`` or ``torch``.
Forcing a backend that cannot run the tensors raises instead of silently falling back (forced
flash-attn with pages that are not a multiple of 256 included).
``attention_backend(device, dtype, head_dim, block_size=None)`` reports the choice (block_size:
the cache's page size, None for the cache-free prefill), and each new choice is logged once at
INFO level on the ``ovfast.kernels.attention`` logger.

Page size: ``preferred_block_size(device, dtype, head_dim)`` is what the engine should build its
cache with: 256 when flash-attn would run the paged ops, else 16 (small pages waste less memory,
at most one partly filled page per sequence, and the Triton kernels gather their key tiles through
the block table position by position, so the page size does not set their tile size).

These entry points run when ``ovfast.ops.backends`` routes an op to the kernels (``OVFAST_KERNELS``
``auto`` on CUDA, or ``triton``); with ``OVFAST_KERNELS=torch`` neither flash-attn nor Triton runs.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from ovfast import ops
from ovfast.ops.backends import Switch, kernel_for
from ovfast.settings import environment

from ._runtime import INTERPRET
from .chunk_attention import attention_chunk as _triton_chunk
from .decode_attention import attention_decode as _triton_decode
from .prefill_attention import attention_prefill as _triton_prefill

log = logging.getLogger(__name__)

MODES = environment.ATTENTION_MODES
ATTENTION = Switch("OVFAST_ATTENTION", MODES, environment.attention())


def set_attention_mode(mode: str) -> None:
    ATTENTION.set(mode)


def get_attention_mode() -> str:
    return ATTENTION.value


def attention_mode(mode: str):
    """Run a block with another attention mode."""
    return ATTENTION.using(mode)


@functools.cache
def flash_attn_module():
    """The flash_attn package, or None when it is not installed (looked up once; tests clear the cache)."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


@functools.cache
def _sm80_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


FLASH_ATTN_PAGE = 256  # flash-attn 2's paged kvcache path: "block size must be divisible by 256"
SMALL_PAGE = 16  # the Triton kernels' page size (see preferred_block_size)


def flash_attn_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash-attn 2 runs these tensors: CUDA sm80+, fp16/bf16, head_dim % 8 == 0 and <= 256."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and _sm80_or_newer(torch.device(device)))


def _triton_runs(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" or INTERPRET


_reported: set[tuple] = set()


def attention_backend(device, dtype: torch.dtype, head_dim: int, block_size: int | None = None) -> str:
    """The backend ("flash_attn", "triton" or "torch") attention uses for these tensors now.

    ``block_size``: the paged cache's page size for decode and chunks (None: no cache, prefill).
    flash-attn's paged path needs a multiple of 256: under ``auto`` other page sizes go to Triton;
    a forced ``flash_attn`` raises for them.
    """
    device = torch.device(device)
    mode = ATTENTION.value
    page_ok = block_size is None or block_size % FLASH_ATTN_PAGE == 0
    if mode == "flash_attn":
        if flash_attn_module() is None:
            raise RuntimeError("OVFAST_ATTENTION=flash_attn but the flash_attn package is not importable")
        if not flash_attn_supports(device, dtype, head_dim):
            raise RuntimeError(f"OVFAST_ATTENTION=flash_attn cannot run {dtype} tensors on {device} with "
                               f"head_dim {head_dim} (needs CUDA sm80+, fp16/bf16, head_dim % 8 == 0, <= 256)")
        if not page_ok:
            raise RuntimeError(f"OVFAST_ATTENTION=flash_attn cannot read a KV cache of {block_size}-position pages: "
                               f"flash-attn's paged attention needs a page size that is a multiple of "
                               f"{FLASH_ATTN_PAGE} (build the cache with ovfast.kernels.preferred_block_size, or "
                               f"use OVFAST_ATTENTION=auto or triton)")
        choice = "flash_attn"
    elif mode == "triton":
        if not _triton_runs(device):
            raise RuntimeError(f"OVFAST_ATTENTION=triton needs CUDA tensors or TRITON_INTERPRET=1 (got {device})")
        choice = "triton"
    elif mode == "torch":
        choice = "torch"
    elif page_ok and flash_attn_module() is not None and flash_attn_supports(device, dtype, head_dim):
        choice = "flash_attn"
    else:
        choice = "triton" if _triton_runs(device) else "torch"
    key = (choice, device.type, dtype, head_dim, block_size)
    if key not in _reported:
        _reported.add(key)
        log.info("attention backend for %s %s head_dim %d%s: %s (OVFAST_ATTENTION=%s)", device.type, dtype,
                 head_dim, "" if block_size is None else f" pages of {block_size}", choice, mode)
    return choice


def preferred_block_size(device, dtype: torch.dtype, head_dim: int) -> int:
    """The page size the KV cache should use for these tensors: 256 when flash-attn would run the
    paged attention ops (its paged path accepts nothing else), else 16.

    Why 16 otherwise: a sequence wastes at most one partly filled page, so small pages keep the
    cache's slack (and what a copy-on-write or prefix share must duplicate) small, and the Triton
    kernels run fine on them: their key tiles are gathered position by position through the block
    table, 64 positions (4 pages) per tile on a GPU, so the page size does not set the tile size.
    With the kernels off for these tensors (``OVFAST_KERNELS=torch``, or a CPU without the
    interpreter) flash-attn never runs either: 16.
    """
    device = torch.device(device)
    if kernel_for("attention_decode", device) is None:
        return SMALL_PAGE
    if attention_backend(device, dtype, head_dim, block_size=FLASH_ATTN_PAGE) == "flash_attn":
        return FLASH_ATTN_PAGE
    return SMALL_PAGE


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """``ovfast.ops.attention_prefill`` on the selected backend: q (T, Hq, d), k/v (T, Hkv, d) -> (T, Hq, d)."""
    backend = attention_backend(q.device, q.dtype, q.shape[-1])
    if backend == "flash_attn":
        fa = flash_attn_module()
        return fa.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal,
        )
    if backend == "triton":
        return _triton_prefill(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    return ops.attention_prefill.reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)


def attention_chunk(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, start: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``ovfast.ops.attention_chunk`` on the selected backend: q (T, Hq, d) at positions start.. of one
    sequence, its pages (num_blocks, block_size, Hkv, d) read through block_table -> (T, Hq, d)."""
    backend = attention_backend(q.device, q.dtype, q.shape[-1], block_size=k_cache.shape[1])
    if backend == "flash_attn":
        fa = flash_attn_module()
        t = q.shape[0]
        # Bottom-right aligned causal mask: row i sees cache positions <= (start + T) - T + i. The
        # length goes in as a (1,) tensor: an int would be broadcast to k_cache.shape[0] rows.
        lens = torch.full((1,), start + t, dtype=torch.int32, device=q.device)
        out = fa.flash_attn_with_kvcache(
            q[None], k_cache, v_cache, cache_seqlens=lens, block_table=block_table[None].to(torch.int32),
            softmax_scale=scale, causal=True,
        )  # (1, T, Hq, d)
        return out[0]
    if backend == "triton":
        return _triton_chunk(q, k_cache, v_cache, block_table, start, scale=scale)
    return ops.attention_chunk.reference(q, k_cache, v_cache, block_table, start, scale=scale)


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """``ovfast.ops.attention_decode`` on the selected backend: q (B, Hq, d), pages (num_blocks,
    block_size, Hkv, d) read through block_tables[:B] -> (B, Hq, d)."""
    backend = attention_backend(q.device, q.dtype, q.shape[-1], block_size=k_cache.shape[1])
    if backend == "flash_attn":
        fa = flash_attn_module()
        bsz = q.shape[0]
        # The new k/v are already in the cache, so no k=/v=; flash-attn wants exactly B table rows
        # (int32, contiguous last axis: a row slice of the engine's table is a view). Idle rows
        # (length 0) take its kernels' early exit and read no page; rows never mix.
        out = fa.flash_attn_with_kvcache(
            q[:, None], k_cache, v_cache, cache_seqlens=seq_lens.to(torch.int32),
            block_table=block_tables[:bsz].to(torch.int32), softmax_scale=scale, causal=True,
        )  # (B, 1, Hq, d)
        return out[:, 0]
    if backend == "triton":
        return _triton_decode(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
    return ops.attention_decode.reference(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
