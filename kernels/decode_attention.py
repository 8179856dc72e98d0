"""Decode attention over the paged KV cache: one new query per sequence (split-KV, "flash-decoding").

Math, for batch row b with L = seq_lens[b] valid positions (the new token's k/v already written),
query head h and its kv head j = h // g (g = Hq / Hkv), and position n stored at slot n % P of
page block_tables[b, n // P] (P = the page size, k_cache.shape[1]):

    out[b, h] = sum_{n < L} softmax_n(scale * q[b, h] . K[b, n, j]) V[b, n, j]

Paged layout: k_cache and v_cache are one layer's pages, (num_blocks, P, Hkv, d); a sequence's
positions live in the pages its block-table row lists in order (page 0 is the engine's reserved
"null" block that padding entries point to; nothing here relies on that, entries past a row's
length are never read). Any page size works (a constexpr; powers of two make the page / slot
split two shifts); ``ovfast.kernels.preferred_block_size`` picks 16 when these kernels run
attention and 256 when flash-attn does.

Two launches:

1. ``_attention_decode_kernel``, grid (B, Hkv, num_splits). Each program takes one (row, kv
   head, split) and all g query heads of the group at once: the group's q rows form a small
   (BLOCK_G, d) matrix dotted with each (BLOCK_N, d) key tile, so every KV page is read from
   HBM once for the whole group. The live length L is read on the device and divided evenly
   (in whole BLOCK_N tiles) over the num_splits programs, so the split count is static while
   the work follows L; a split starting at or past L runs no iteration and records the empty
   state (m = -inf, l = 0, acc = 0). A key tile is BLOCK_N consecutive positions: each
   position's page id comes from the block table (BLOCK_N / P whole pages when BLOCK_N >= P,
   the part of one page otherwise), so K and V are gathered page by page with 64-bit page
   offsets. Positions >= L are masked out of every load (the table entries past the row's
   pages and whatever the last page holds past L are never touched). It writes fp32 partials
   (row max m in log2 units, row sum l, unnormalised accumulator) to a workspace
   (B, Hq, num_splits, d + 2).
2. ``_attention_decode_combine_kernel``, grid (B, Hq): the log-sum-exp merge
   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s. Empty splits weigh
   2^-inf = 0; an idle row (L = 0) yields zeros, never NaN. With one split (SINGLE_SPLIT) the
   first kernel normalises and writes ``out`` itself and the second launch is skipped.

num_splits depends only on static quantities (B, Hkv, the table's capacity max_blocks * P and
the device's SM count): two programs per SM at full length (2 * SMs / (B * Hkv)), at most 64 and
at most one per key tile of the capacity. No host read of seq_lens or of the block table, no
data-dependent allocation or grid: the launch is CUDA-graph capturable (the workspace comes from
the caching allocator, inside the graph pool during a capture), and replays follow new seq_lens
and block-table contents written in place.

Shapes: q (B, Hq, d), any strides; k_cache and v_cache (num_blocks, P, Hkv, d), any strides
(per-layer views of the engine's cache); block_tables (>= B, max_blocks) int32/int64, any
strides (row b is sequence b's); seq_lens (B,) int32/int64 on the device (a length above the
table's capacity max_blocks * P is clamped to it). Returns (B, Hq, d) in q's dtype.

Tolerance against ``ovfast.ops.attention_decode.reference``: as prefill (fp32 1e-5; 16-bit at most
twice the low-precision reference's error plus a small atol).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, num_sms, online_softmax_step, round_to

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # the combine kernel holds all splits' partials of one head in registers


@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, ws_ptr, out_ptr,
    qk_scale, group, num_splits, max_blocks,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_blk, stride_k_s, stride_k_h, stride_k_d,
    stride_v_blk, stride_v_s, stride_v_h, stride_v_d,
    stride_t_b, stride_t_n,
    stride_ws_b, stride_ws_h, stride_ws_s, stride_out_b, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # num_splits and max_blocks are runtime values: batch sizes that change them compile nothing new.
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    row64 = row.to(tl.int64)
    # Never past what the table can address (an over-long seq_len would read past the row).
    seq_len = tl.minimum(tl.load(seq_lens_ptr + row).to(tl.int32), max_blocks * PAGE)
    # This split's share of the live length, in whole key tiles, computed on the device.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_base = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_g  # the query group of this kv head
    g_mask = offs_g < group
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + row64 * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    table = tables_ptr + row64 * stride_t_b
    k_head = k_ptr + kv_head * stride_k_h + offs_d[None, :] * stride_k_d  # (1, BLOCK_D) pointers
    v_head = v_ptr + kv_head * stride_v_h + offs_d[None, :] * stride_v_d

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n_base
        n_mask = offs_n < end
        # Page of each position (P constexpr: a shift for powers of two); masked positions read nothing.
        page = tl.load(table + (offs_n // PAGE) * stride_t_n, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + page[:, None] * stride_k_blk + slot[:, None] * stride_k_s, mask=kv_mask, other=0.0)
        v = tl.load(v_head + page[:, None] * stride_v_blk + slot[:, None] * stride_v_s, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))  # key start_n < end is always visible
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_FP32, DOT_PRECISION)

    if SINGLE_SPLIT:  # no combine pass: normalise here (l = 0 only for L = 0 -> zeros)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row64 * stride_out_b + heads[:, None] * stride_out_h + offs_d[None, :],
                 round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=g_mask[:, None] & d_mask[None, :])
    else:
        ws = ws_ptr + row64 * stride_ws_b + heads * stride_ws_h + split * stride_ws_s  # (BLOCK_G,) pointers
        tl.store(ws[:, None] + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(ws + HEAD_DIM, m_i, mask=g_mask)
        tl.store(ws + HEAD_DIM + 1, l_i, mask=g_mask)


@triton.jit
def _attention_decode_combine_kernel(
    ws_ptr, out_ptr,
    num_splits,
    stride_ws_b, stride_ws_h, stride_ws_s, stride_out_b, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    ws = ws_ptr + row * stride_ws_b + head * stride_ws_h + offs_s * stride_ws_s  # (BLOCK_S,) pointers
    m = tl.load(ws + HEAD_DIM, mask=s_mask, other=float("-inf"))
    l = tl.load(ws + HEAD_DIM + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # L = 0: every split empty
    w = tl.exp2(m - m_max)  # empty splits: 2^-inf = 0
    denom = tl.sum(l * w, axis=0)
    acc = tl.load(ws[:, None] + offs_d[None, :], mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)  # (BLOCK_D,)
    out = num / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * stride_out_b + head * stride_out_h + offs_d,
             round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=offs_d < HEAD_DIM)


def _config(head_dim: int, capacity: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): 64-key tiles (16 KB of bf16 K per 128-wide tile), 4 warps.

    Memory-bound, so the K/V loads should run ahead of the math. They are indirect (their
    addresses come from the block-table load), and Triton's pipeliner splits the loop's
    num_stages - 1 stages of latency between the table load and the K/V loads it feeds: 5 stages
    give K and V two buffers each, the depth the contiguous-cache kernel had with 3 (70 KB of
    shared memory at d = 128 in bf16, 140 KB in fp32, within the H100's 227 KB; 3 stages would
    leave one buffer, 38 KB). 256-wide heads: 32-key tiles, one buffer (41 KB bf16) as before.
    Checked by tests/kernels/sm90_compile.py. With 16-position pages a tile gathers 4 pages
    (each a contiguous 16 x d run per kv head).
    Interpreter: 16-key tiles for small (test) caches so they span several tiles and splits,
    128-key tiles for big ones (an interpreted step costs about the same whatever its size).
    ``capacity`` is the longest sequence the block tables can hold (max_blocks * page size).
    """
    if INTERPRET:
        return (16 if capacity <= 256 else 128), 1, 1
    if triton.next_power_of_2(head_dim) <= 128:
        return 64, 4, 5
    return 32, 4, 3


def num_splits(batch: int, kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Static split count: two programs per SM over the whole batch, <= MAX_SPLITS, <= key tiles."""
    want = triton.cdiv(2 * num_sms(device), max(1, batch * kv_heads))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(capacity, block_n)))


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(page size, Hkv, group) of a paged cache that fits q (..., Hq, d); raises on a mismatch."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"the caches must be (num_blocks, block_size, Hkv, d) alike; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q {q.dtype} and the caches {k_cache.dtype}/{v_cache.dtype} must share a dtype")
    hq, d = q.shape[-2:]
    _, page, hkv, d_cache = k_cache.shape
    if d_cache != d:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} (head_dim)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported")
    if page < 1:
        raise ValueError(f"block size {page} must be positive")
    return page, hkv, hq // hkv


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.attention_decode``: (B, Hq, d) attention of one query per sequence
    over its pages."""
    check_float("q", q)
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, d); got {tuple(q.shape)}")
    page, hkv, group = check_paged_cache(q, k_cache, v_cache)
    bsz, hq, d = q.shape
    if block_tables.dim() != 2 or block_tables.shape[0] < bsz or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be (>= {bsz}, max_blocks) int32/int64, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if seq_lens.shape != (bsz,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be ({bsz},) int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if seq_lens.stride(0) != 1:
        seq_lens = seq_lens.contiguous()
    out = torch.empty((bsz, hq, d), dtype=q.dtype, device=q.device)
    max_blocks = block_tables.shape[1]
    if bsz == 0:
        return out
    if max_blocks == 0:  # nothing addressable: every row is idle
        return out.zero_()
    if scale is None:
        scale = d**-0.5
    capacity = max_blocks * page
    block_n, num_warps, num_stages = _config(d, capacity)
    splits = num_splits(bsz, hkv, capacity, block_n, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    # fp32 partials: d accumulator values, then the row max m and row sum l, per (row, head, split).
    ws = torch.empty((bsz, hq, splits, d + 2) if splits > 1 else (1, 1, 1, 1), dtype=torch.float32, device=q.device)
    _attention_decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, ws, out,
        float(scale) * LOG2E, group, splits, max_blocks,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        PAGE=page, SINGLE_SPLIT=splits == 1, DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _attention_decode_combine_kernel[(bsz, hq)](
            ws, out, splits, ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
            INTERPRET=INTERPRET, num_warps=4 if block_d * splits >= 2048 else 1,
        )
    return out
