"""Decode attention: one new query per sequence against the static KV cache (split-KV).

Math, for batch row b (cache slot b) with L = seq_lens[b] valid positions (the new token's k/v
already written), query head h and its kv head j = h // g (g = Hq / Hkv):

    out[b, h] = sum_{n < L} softmax_n(scale * q[b, h] . k_cache[b, n, j]) v_cache[b, n, j]

"Flash-decoding" in two launches:

1. ``_attention_decode_kernel``, grid (B, Hkv, num_splits). Each program takes one (row, kv
   head, split) and all g query heads of the group at once: the group's q rows form a small
   (BLOCK_G, d) matrix dotted with each (BLOCK_N, d) key block, so every KV head is read from
   HBM once for the whole group. The live length L is read on the device and divided evenly
   (in whole BLOCK_N blocks) over the num_splits programs, so the split count is static while
   the work follows L; a split starting at or past L runs no iteration and records the empty
   state (m = -inf, l = 0, acc = 0). It writes fp32 partials (row max m in log2 units, row sum
   l, unnormalised accumulator) to a workspace (B, Hq, num_splits, d + 2).
2. ``_attention_decode_combine_kernel``, grid (B, Hq): out = sum_s 2^(m_s - M) acc_s /
   sum_s 2^(m_s - M) l_s with M = max_s m_s. Empty splits weigh 2^-inf = 0; a row with L = 0
   (an inert padding lane) yields zeros, never NaN. With one split (SINGLE_SPLIT) the first kernel
   normalises and writes ``out`` itself and the second launch is skipped.

num_splits depends only on static quantities (B, Hkv, S_max and the device's SM count): enough
programs for two per SM at full length (2 * SMs / (B * Hkv)), at most 64 and at most one per
key block of S_max. No host sync, no data-dependent allocation or grid: the launch is
CUDA-graph capturable (the workspace comes from the caching allocator, inside the graph pool
during a capture).

Shapes (the flash-attn kvcache layout): q (B, Hq, d), any strides; k_cache and v_cache
(slots, S_max, Hkv, d) with slots >= B, any strides (per-layer views of the engine's cache; row b
reads slot b); seq_lens (B,) int32 or int64 on the device. Returns (B, Hq, d) in q's dtype.

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
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, ws_ptr, out_ptr,
    qk_scale, group, num_splits,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_b, stride_k_s, stride_k_h, stride_k_d,
    stride_v_b, stride_v_s, stride_v_h, stride_v_d,
    stride_ws_b, stride_ws_h, stride_ws_s, stride_out_b, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # num_splits is a runtime value: batch sizes that change it do not compile new variants.
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    # This split's share of the live length, in whole key blocks, computed on the device.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g  # the query group of this kv head
    g_mask = offs_g < group
    d_mask = offs_d < HEAD_DIM
    row64 = row.to(tl.int64)
    q = tl.load(q_ptr + row64 * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + row64 * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + row64 * stride_v_b + kv_head * stride_v_h

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_k_s + offs_d[None, :] * stride_k_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_v_s + offs_d[None, :] * stride_v_d, mask=kv_mask, other=0.0)
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


def _config(head_dim: int, s_max: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): 64-key blocks (16 KB of bf16 K per 128-wide block), 4 warps.

    Memory-bound: a 64 x d tile per stage and 3 stages keep ~70 KB in flight per program at d = 128
    (fp32: 140 KB, within the H100's 227 KB; checked by tests/kernels/sm90_compile.py).
    Interpreter: 16-key blocks for small (test) caches so they span several blocks and splits,
    128-key blocks for big ones (an interpreted step costs about the same whatever its size).
    """
    if INTERPRET:
        return (16 if s_max <= 256 else 128), 1, 1
    if triton.next_power_of_2(head_dim) <= 128:
        return 64, 4, 3
    return 32, 4, 2


def num_splits(batch: int, kv_heads: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Static split count: two programs per SM over the whole batch, <= MAX_SPLITS, <= key blocks."""
    want = triton.cdiv(2 * num_sms(device), max(1, batch * kv_heads))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(s_max, block_n)))


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.attention_decode``: (B, Hq, d) attention of one query per slot."""
    check_float("q", q)
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens)
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be (B, Hq, d) and the caches (slots, S_max, Hkv, d); got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q {q.dtype} and the caches {k_cache.dtype}/{v_cache.dtype} must share a dtype")
    bsz, hq, d = q.shape
    slots, s_max, hkv, d_cache = k_cache.shape
    if d_cache != d or bsz > slots:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} (head_dim, B <= slots)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported")
    if seq_lens.shape != (bsz,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be ({bsz},) int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if seq_lens.stride(0) != 1:
        seq_lens = seq_lens.contiguous()
    out = torch.empty((bsz, hq, d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if scale is None:
        scale = d**-0.5
    group = hq // hkv
    block_n, num_warps, num_stages = _config(d, s_max)
    splits = num_splits(bsz, hkv, s_max, block_n, q.device)
    block_d = triton.next_power_of_2(d)
    # fp32 partials: d accumulator values, then the row max m and row sum l, per (row, head, split).
    ws = torch.empty((bsz, hq, splits, d + 2) if splits > 1 else (1, 1, 1, 1), dtype=torch.float32, device=q.device)
    _attention_decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, seq_lens, ws, out,
        float(scale) * LOG2E, group, splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        SINGLE_SPLIT=splits == 1, DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
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
