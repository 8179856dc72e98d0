"""Chunked-prefill attention over the paged KV cache: a prompt chunk of one sequence against its
cached pages and itself (causal).

Math, for chunk row i (position p_i = start + i, 0 <= i < T), query head h and its kv head
j = h // g (g = Hq / Hkv), with position n stored at slot n % P of page block_table[n // P]
(P = the page size, k_cache.shape[1]) and the chunk's own k/v already written there:

    out[i, h] = sum_{n <= p_i} softmax_n(scale * q[i, h] . K[n, j]) V[n, j]

One launch, FlashAttention-2 style, grid (cdiv(T, BLOCK_M), Hq): a program owns BLOCK_M query
rows of one head, streams the sequence's keys in BLOCK_N-position tiles through the block table
(each position's page id is loaded from the table, so a tile is BLOCK_N / P whole pages, or part
of one page when P > BLOCK_N; page offsets are 64-bit) and keeps a running row max m, row sum l
and fp32 accumulator (online softmax in base 2, scale folded with log2(e)). Key tiles left of
the program's first position (start + its first row) are seen in full by every row and run
without masks; only the last tiles, from there up to its last row's position, are masked
(causal, and nothing past start + T is loaded: the table may end at the chunk's last page). So a
chunk late in a long prompt pays masks on about BLOCK_M / BLOCK_N + 1 tiles, whatever ``start``.

Today's chunks are not graph-captured: ``start`` and T are host ints, and the grid is built from
T. Shapes: q (T, Hq, d), any strides; k_cache and v_cache (num_blocks, P, Hkv, d), any strides;
block_table (>= ceil((start + T) / P),) int32/int64. Returns (T, Hq, d) contiguous in q's dtype.

Tolerance against ``ovfast.ops.attention_chunk.reference``: as prefill (fp32 1e-5; 16-bit at most
twice the low-precision reference's error plus a small atol).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, online_softmax_step, round_to
from .decode_attention import check_paged_cache

LOG2E = 1.4426950408889634


@triton.jit
def _chunk_block(
    acc, m_i, l_i, q, table, k_head, v_head, start_n, offs_n_base, pos, hi, d_mask, qk_scale,
    stride_t, stride_k_blk, stride_k_s, stride_v_blk, stride_v_s,
    MASKED: tl.constexpr, MASK_D: tl.constexpr, PAGE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of the program's rows against positions [start_n, start_n + BLOCK_N).

    MASKED: the tile may hold positions past a row's own (causal) or past ``hi`` (the program's
    last row's position + 1, <= start + T): those are neither loaded (table included) nor seen.
    """
    offs_n = start_n + offs_n_base
    slot = offs_n % PAGE
    if MASKED:
        n_mask = offs_n < hi
        page = tl.load(table + (offs_n // PAGE) * stride_t, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask
        k = tl.load(k_head + page[:, None] * stride_k_blk + slot[:, None] * stride_k_s, mask=kv_mask, other=0.0)
        v = tl.load(v_head + page[:, None] * stride_v_blk + slot[:, None] * stride_v_s, mask=kv_mask, other=0.0)
    else:
        page = tl.load(table + (offs_n // PAGE) * stride_t).to(tl.int64)
        k_ptrs = k_head + page[:, None] * stride_k_blk + slot[:, None] * stride_k_s
        v_ptrs = v_head + page[:, None] * stride_v_blk + slot[:, None] * stride_v_s
        if MASK_D:
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        s = tl.where((offs_n[None, :] <= pos[:, None]) & (offs_n < hi)[None, :], s, float("-inf"))
    # Never -inf - -inf: every row sees the first position of the first tile it runs (position 0,
    # or lo <= its own position), so the running max is finite from the first step on.
    return online_softmax_step(acc, m_i, l_i, s, v, DOT_FP32, DOT_PRECISION)


@triton.jit
def _attention_chunk_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, out_ptr,
    qk_scale, group, start, num_rows,
    stride_q_t, stride_q_h, stride_q_d,
    stride_k_blk, stride_k_s, stride_k_h, stride_k_d,
    stride_v_blk, stride_v_s, stride_v_h, stride_v_d,
    stride_t, stride_out_t, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = start + offs_m  # each row's position in the sequence
    q_mask = (offs_m[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM)  # also the store mask
    q = tl.load(q_ptr + offs_m[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    d_mask = offs_d[None, :] < HEAD_DIM
    k_head = k_ptr + kv_head * stride_k_h + offs_d[None, :] * stride_k_d  # (1, BLOCK_D) pointers
    v_head = v_ptr + kv_head * stride_v_h + offs_d[None, :] * stride_v_d

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # [0, lo): whole tiles before the program's first position, seen by every row -> no masks.
    # [lo, hi): up to the program's last position (causal diagonal, chunk end) -> masked.
    lo = ((start + start_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    hi = start + tl.minimum((start_m + 1) * BLOCK_M, num_rows)
    for start_n in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _chunk_block(
            acc, m_i, l_i, q, table_ptr, k_head, v_head, start_n, offs_n_base, pos, hi, d_mask, qk_scale,
            stride_t, stride_k_blk, stride_k_s, stride_v_blk, stride_v_s,
            False, BLOCK_D != HEAD_DIM, PAGE, DOT_FP32, DOT_PRECISION,
        )
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _chunk_block(
            acc, m_i, l_i, q, table_ptr, k_head, v_head, start_n, offs_n_base, pos, hi, d_mask, qk_scale,
            stride_t, stride_k_blk, stride_k_s, stride_v_blk, stride_v_s,
            True, BLOCK_D != HEAD_DIM, PAGE, DOT_FP32, DOT_PRECISION,
        )
    out = acc / l_i[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_out_t + head * stride_out_h + offs_d[None, :],
             round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=q_mask)


def _config(head_dim: int, rows: int, total: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    GPU: the prefill kernel's tiles (128 x 64 for 16-bit heads up to 128, 8 warps at 128; fp32
    64 x 32), with BLOCK_M shrunk to the chunk for short chunks (>= 16, 4 warps), so a 1-row chunk
    does not run 127 dead rows. With 16-position pages a 64-key tile gathers 4 pages. The K/V
    loads are indirect (addressed through the block-table load) and Triton's pipeliner spends
    stages on the table load too, so the stage counts are the prefill kernel's plus two (plus one
    for its 2-stage configs): the same K/V buffering, about the same shared memory (129 KB at
    d = 128 in 16-bit against prefill's 128 KB; checked by tests/kernels/sm90_compile.py).
    Interpreter: 16 x 16 tiles for short (test) sequences, so several query tiles and key tiles,
    and both loops, run; 128 x 128 for long ones (interpreted steps are costly).
    """
    if INTERPRET:
        return (16, 16, 1, 1) if total <= 256 else (128, 128, 1, 1)
    block_d = triton.next_power_of_2(head_dim)
    if elem_bytes == 4:
        block_m, block_n, warps, stages = (64, 32, 4, 3) if block_d <= 128 else (32, 32, 4, 3)
    elif block_d <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 5
    elif block_d <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 5
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 3
    if rows < block_m:
        block_m, warps = max(16, triton.next_power_of_2(rows)), 4
    return block_m, block_n, warps, stages


def attention_chunk(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, start: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.attention_chunk``: a (T, Hq, d) chunk at positions start.. of one
    sequence against its pages (causal)."""
    check_float("q", q)
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_table=block_table)
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, d); got {tuple(q.shape)}")
    page, _, group = check_paged_cache(q, k_cache, v_cache)
    t, hq, d = q.shape
    start = int(start)
    if start < 0:
        raise ValueError(f"start {start} must be >= 0")
    if block_table.dim() != 1 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be (max_blocks,) int32/int64, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if block_table.numel() * page < start + t:
        raise ValueError(f"block_table holds {block_table.numel()} pages of {page}: fewer than the "
                         f"{start + t} positions of the chunk's sequence")
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    if scale is None:
        scale = d**-0.5
    block_m, block_n, num_warps, num_stages = _config(d, t, start + t, q.element_size())
    _attention_chunk_kernel[(triton.cdiv(t, block_m), hq)](
        q, k_cache, v_cache, block_table, out,
        float(scale) * LOG2E, group, start, t,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
